# Device command (one H200; carry [".tlkit"]): MTP speculative decode (s_q 2: 32 query rows per
# sequence on the 16-head 1B model, so tilelang_absorb runs its TileLang kernel from 32k cached
# tokens on), auto vs triton_absorb, CUDA graphs; and whether F.rms_norm is one CUDA kernel.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/eng5; mkdir -p $W
python3 - > $W/rms_norm_kernels.log 2>&1 <<'PY'
import torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
x = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16); w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
F.rms_norm(x, (2048,), w, 1e-6); torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as p:
    F.rms_norm(x, (2048,), w, 1e-6); torch.cuda.synchronize()
ks = [e.key for e in p.key_averages() if e.device_type.name == "CUDA"]
print(f"torch {torch.__version__}: F.rms_norm bf16 (128 x 2048) launches {len(ks)} CUDA kernel(s): {ks}")
PY
cat $W/rms_norm_kernels.log
timeout 400 python3 benchmarks/engine_decode_h200/run.py --budget-s 300 --modes mtp_graphs --backends auto triton --paths absorb --out $W > $W/eng.log 2>&1; grep -v "TileLang:" $W/eng.log | tail -25
