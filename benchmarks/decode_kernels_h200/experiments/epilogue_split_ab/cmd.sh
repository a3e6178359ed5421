# Device command (one H200; carry [".tlkit"])
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/esab; mkdir -p $W
timeout 200 python3 benchmarks/decode_kernels_h200/experiments/epilogue_split_ab/run.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/run1.log; cat $W/run1.log
