# Device command (one H200; carry [".tlkit"]): the Triton decode kernels compiled at engine load
# (session 7, triton_decode.warmup_plan). Triton's cache starts empty (TRITON_CACHE_DIR), so every
# Triton compile happens in this process: at load (the backend's warm-up) or -- if the warm-up
# missed a variant -- in a decode step, which first_step_s would show. triton_* backends, both
# paths, plain and MTP decode under CUDA graphs.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/eng11; mkdir -p $W
export TRITON_CACHE_DIR=$(mktemp -d)
timeout 300 python3 benchmarks/engine_decode_h200/run.py --budget-s 200 --modes plain_graphs mtp_graphs --backends triton --paths absorb gqa --batches 8 32 --contexts 8192 --out $W > $W/eng.log 2>&1; grep -v "TileLang:" $W/eng.log | tail -n 12
