# Device command (one H200; carry [".tlkit"]): the scores-warpgroup variants (see run.py's docstring)
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/var; mkdir -p $W
OUT=$W timeout 560 python3 benchmarks/decode_kernels_h200/experiments/tilelang_softmax_variants/run.py 2>&1 | grep -v "TileLang:\|Warning: T.vectorized" > $W/run.log; tail -16 $W/run.log
