# Device command of run 13 (one H200; carry [".tlkit"]): the TileLang absorb kernel with the cheaper
# mask and folded softmax scale (session 6): kernels compiled in parallel first, GPU tests, the
# variants experiment (run 2: "" vs "n", split kernel alone), then the grid and 128 heads
# (ran at commit 4a2ba09~1 = f962b23, where precompile --opts and the "n" switch existed; both were removed later)
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run13; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py --opts n 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/precompile.log; tail -1 $W/precompile.log
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py -x > $W/tests.log 2>&1; tail -2 $W/tests.log
OUT=$W timeout 100 python3 benchmarks/decode_kernels_h200/experiments/tilelang_softmax_variants/run.py "" n 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/variants.log; grep "^h" $W/variants.log | cut -c1-40,100-
B="python3 -m gqla_megatron.cli.bench decode --path absorb --kernels triton,tilelang"
timeout 140 $B --peers bmm --out $W/grid > $W/grid.log 2>&1; grep "absorb B=" $W/grid.log | cut -c1-120 | head -12
timeout 60 $B --shapes h128 --peers bmm --context 4k,32k --out $W/h128 > $W/h128.log 2>&1; grep "absorb B=" $W/h128.log | cut -c1-120 | head -6
cd $W && tar czf $OUT/run13.tgz grid h128 && rm -rf grid h128
