# Device command of run 2 (one H200; carry [".tlkit"]), session 8, after the TileLang planner change
# (tilelang_decode.MIN_CHUNK 64, splits scored in whole tiles): new vs earlier split counts where they
# differ, then the GPU tests of the TileLang kernels and the load-time warm-up on the new planner.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/splits2; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" | tail -n 1
timeout 200 python3 benchmarks/decode_kernels_h200/experiments/splits_per_layer/run.py --run2 --layers 32 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/run2.log; cat $W/run2.log | cut -c1-150
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py tests/gpu/test_decode_warmup_gpu.py > $W/tests.log 2>&1; tail -n 3 $W/tests.log
