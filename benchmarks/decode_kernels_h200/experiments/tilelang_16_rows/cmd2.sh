# Device command, run 2 (one H200; carry [".tlkit"])
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/rows16; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | tail -n 1
timeout 300 python3 benchmarks/decode_kernels_h200/experiments/tilelang_16_rows/run.py run2 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/run2.log; cat $W/run2.log
