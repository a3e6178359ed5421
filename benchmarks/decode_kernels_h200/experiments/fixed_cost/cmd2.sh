# Device command (one H200; carry [".tlkit"]): run 2 (see run2.py)
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/fixed2; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | tail -n 1
timeout 150 python3 benchmarks/decode_kernels_h200/experiments/fixed_cost/run2.py 2>&1 | grep -v "TileLang:" > $W/run2.log; cat $W/run2.log
