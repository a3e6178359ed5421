# Device command (one H200; carry [".tlkit"]), session 9: the seesaw schedule of the TileLang
# absorb kernel -- the package's TileLang GPU tests with it switched on, then the A/B.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
E=benchmarks/decode_kernels_h200/experiments/seesaw
W=$OUT/seesaw; mkdir -p $W
timeout 200 python3 scripts/tilelang_precompile.py --seesaw 2>&1 | grep -v "TileLang:\|Warning: T.vec" | tail -n 1
GQLA_TILELANG_SEESAW=1 timeout 120 python3 -m pytest -q -x -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py > $W/tests_seesaw_on.log 2>&1; tail -n 3 $W/tests_seesaw_on.log
timeout 240 python3 $E/run.py --layers 32 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/run1.log; cut -c1-250 $W/run1.log
