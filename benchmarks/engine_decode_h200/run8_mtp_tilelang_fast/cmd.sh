# Device command (one H200; carry [".tlkit"]): run 6 again after the TileLang kernel's cheaper mask and
# select-free softmax (session 6): MTP speculative decode (s_q 2 = 32 query rows per sequence on the
# 16-head 1B model), auto (tilelang_absorb, compiled at load) vs triton_absorb, CUDA graphs
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/eng8; mkdir -p $W
timeout 420 python3 benchmarks/engine_decode_h200/run.py --budget-s 300 --modes mtp_graphs --backends auto triton --paths absorb --batches 8 32 128 --contexts 8192 32768 --out $W > $W/eng.log 2>&1; grep -v "TileLang:" $W/eng.log | tail -14 | cut -c1-200
