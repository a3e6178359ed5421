# Device command (one H200; carry [".tlkit"]), session 9: the swapped-operand TileLang kernel
# (<= 32 query rows) -- its GPU tests and the package's TileLang tests with it switched on, then
# the A/B against the row kernel in one process.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
E=benchmarks/decode_kernels_h200/experiments/swap_operands
W=$OUT/swap_operands; mkdir -p $W
timeout 200 python3 scripts/tilelang_precompile.py --swap 2>&1 | grep -v "TileLang:\|Warning: T.vec" | tail -n 1
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py -k swapped > $W/tests_swap.log 2>&1; tail -n 2 $W/tests_swap.log
GQLA_TILELANG_SWAP=1 timeout 150 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py > $W/tests_all_swap_on.log 2>&1; tail -n 2 $W/tests_all_swap_on.log
timeout 240 python3 $E/run.py --layers 32 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/run1.log; cut -c1-220 $W/run1.log
