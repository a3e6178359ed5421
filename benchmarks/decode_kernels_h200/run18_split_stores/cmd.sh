# Device command of run 18 (one H200; carry [".tlkit"]): GPU tests of the TileLang kernels after its
# split calls store their fp32 partials straight from the accumulator (experiments/epilogue_split_ab)
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run18; mkdir -p $W
timeout 100 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" | tail -n 1
timeout 90 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py > $W/tests.log 2>&1; tail -n 1 $W/tests.log
