# Device command of run 18 (one H200; carry [".tlkit"]): the TileLang absorb kernel at 8787be5+
# (split calls store fp32 partials straight from the accumulator; direct bf16 output staged in
# shared memory): GPU tests of both kernel families and of the load-time warm-up, then the absorb
# and 128-head grids (write flush, as runs 14-16).
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run18; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/precompile.log; tail -n 1 $W/precompile.log
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_triton_kernels.py tests/gpu/test_tilelang_kernels.py tests/gpu/test_decode_warmup_gpu.py > $W/tests.log 2>&1; tail -n 3 $W/tests.log
B="python3 -m gqla_megatron.cli.bench decode --path absorb --kernels triton,tilelang --peers bmm"
timeout 60 $B --out $W/absorb > $W/absorb.log 2>&1; tail -n 1 $W/absorb.log | cut -c1-120
timeout 40 $B --shapes h128 --context 4k,32k --out $W/h128 > $W/h128.log 2>&1; tail -n 1 $W/h128.log | cut -c1-120
cd $W && tar czf $OUT/run18.tgz absorb h128 absorb.log h128.log precompile.log tests.log
