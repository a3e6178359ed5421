# Device command (one H200; carry [".tlkit"])
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/timeline; mkdir -p $W
timeout 500 python3 benchmarks/decode_kernels_h200/experiments/timeline/run.py 2>&1 | grep -v "TileLang:" > $W/run1.log; cat $W/run1.log
