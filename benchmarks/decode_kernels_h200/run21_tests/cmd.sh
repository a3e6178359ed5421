# Device command of run 21 (one H200; carry [".tlkit"]), session 8: the GPU suite after the combine
# kernel gained its DISCARD constexpr (off by default; a new test runs it on), both kernel families
# and the load-time warm-up.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run21; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/precompile.log; tail -n 1 $W/precompile.log
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_triton_kernels.py tests/gpu/test_tilelang_kernels.py tests/gpu/test_decode_warmup_gpu.py > $W/tests.log 2>&1; tail -n 3 $W/tests.log
