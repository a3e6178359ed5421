# Device command (one H200; carry [".tlkit"]), session 8: the combine pass discarding the
# partials' L2 lines (triton_decode.COMBINE_DISCARD) vs keeping them, one process.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/discard; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" | tail -n 1
timeout 300 python3 benchmarks/decode_kernels_h200/experiments/combine_discard/run.py --layers 32 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/run1.log; cat $W/run1.log | cut -c1-170
