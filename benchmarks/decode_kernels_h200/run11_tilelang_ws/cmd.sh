# Device command of run 11 (one H200; carry [".tlkit"]): the hand-scheduled TileLang kernel (explicit
# roles, async score products) in the package: GPU tests first, then grid, h128, page 64
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run11; mkdir -p $W
# (tests.log here is from a second call: this 240 s limit cut the first one during TileLang compiles,
#  ~40 s per kernel variant on a fresh machine; rerun with: timeout 540 python3 -m pytest -v -rs
#  -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py -x --durations=8)
timeout 240 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py -x > $W/tests.log 2>&1; tail -3 $W/tests.log
B="python3 -m gqla_megatron.cli.bench decode --path absorb --kernels triton,tilelang"
timeout 150 $B --peers bmm --out $W/grid > $W/grid.log 2>&1; grep "absorb B=" $W/grid.log | sed 's/TB\/s//g' | cut -c1-130
timeout 60 $B --shapes h128 --peers bmm --context 4k,32k --out $W/h128 > $W/h128.log 2>&1; grep "absorb B=" $W/h128.log | cut -c1-130
timeout 90 $B --page-size 64 --peers "" --out $W/p64 > $W/p64.log 2>&1; grep "absorb B=" $W/p64.log | cut -c1-130
cd $W && tar czf $OUT/run11.tgz grid h128 p64 && rm -rf grid h128 p64
