# Device command (one H200; carry [".tlkit"])
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/fixed; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | tail -n 1
timeout 150 python3 benchmarks/decode_kernels_h200/experiments/fixed_cost/run.py 2>&1 | grep -v "TileLang:" > $W/run.log; cat $W/run.log
