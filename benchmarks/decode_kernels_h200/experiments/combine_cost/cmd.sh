# Device command (one H200; carry [".tlkit"])
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/comb; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | tail -n 1
timeout 200 python3 benchmarks/decode_kernels_h200/experiments/combine_cost/run.py 2>&1 | grep -v "TileLang:" > $W/run.log; cat $W/run.log | cut -c1-330
