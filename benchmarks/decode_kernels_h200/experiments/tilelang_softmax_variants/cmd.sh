# Device command of run 1 (one H200; carry [".tlkit"]), at commit 2c327b8 (see run.py's docstring)
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/var; mkdir -p $W
OUT=$W timeout 560 python3 benchmarks/decode_kernels_h200/experiments/tilelang_softmax_variants/run.py "" m mr mo 2>&1 | grep -v "TileLang:\|Warning: T.vectorized" > $W/run.log; tail -16 $W/run.log
