# Device command (one H200; carry [".tlkit"]): run 5 again after the TileLang kernel became the
# hand-scheduled one (session 5): MTP speculative decode (s_q 2 = 32 query rows per sequence on the
# 16-head 1B model), auto (tilelang_absorb) vs triton_absorb, CUDA graphs.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/eng6; mkdir -p $W
timeout 380 python3 benchmarks/engine_decode_h200/run.py --budget-s 240 --modes mtp_graphs --backends auto triton --paths absorb --out $W > $W/eng.log 2>&1; grep -v "TileLang:" $W/eng.log | tail -25
