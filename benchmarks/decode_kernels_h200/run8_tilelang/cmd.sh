# Device command of run 8 (one H200; carry [".tlkit"], built by scripts/make_tilelang_kit.sh)
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run8; mkdir -p $W
(nvcc --version | tail -2; python3 -c "import tilelang, torch, triton; print('tilelang', tilelang.__version__, 'torch', torch.__version__, 'triton', triton.__version__)") > $W/env.log 2>&1; cat $W/env.log
# the bench first (its first cells compile the two contiguous kernels), then the tests
timeout ${BENCH_S:-200} python3 -m gqla_megatron.cli.bench decode --path absorb --kernels triton,tilelang --peers bmm --out $W/grid > $W/grid.log 2>&1; tail -36 $W/grid.log
timeout ${TEST_S:-240} python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py -x > $W/tests.log 2>&1; tail -25 $W/tests.log
