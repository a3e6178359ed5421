# Device command (one H200; carry [".tlkit"]), session 8: split counts of the small cells per layer
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/splits; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" | tail -n 1
timeout 240 python3 benchmarks/decode_kernels_h200/experiments/splits_per_layer/run.py --layers 32 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/run1.log; cat $W/run1.log | cut -c1-170
