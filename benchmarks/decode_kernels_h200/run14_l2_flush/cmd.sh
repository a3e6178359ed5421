# Device command of run 14 (one H200; carry [".tlkit"]): the TileLang absorb kernel without the
# softmax select (session 6), its GPU tests, the L2-flush experiment, then the absorb, h128 and gqa
# grids with the usual write flush and with the read flush
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run14; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/precompile.log; tail -1 $W/precompile.log
timeout 100 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py -x > $W/tests.log 2>&1; tail -1 $W/tests.log
bash benchmarks/decode_kernels_h200/experiments/l2_flush/cmd.sh
for F in write read; do
  B="python3 -m gqla_megatron.cli.bench decode --l2-flush $F"
  timeout 60 $B --path absorb --kernels triton,tilelang --peers bmm --out $W/absorb_$F > $W/absorb_$F.log 2>&1
  timeout 40 $B --path absorb --kernels triton,tilelang --shapes h128 --peers bmm --context 4k,32k --out $W/h128_$F > $W/h128_$F.log 2>&1
  timeout 90 $B --path gqa --peers sdpa_cudnn,sdpa_efficient,sdpa_flash --out $W/gqa_$F > $W/gqa_$F.log 2>&1
  for f in absorb h128 gqa; do tail -n 1 $W/${f}_$F.log | cut -c1-100; done
done
cd $W && tar czf $OUT/run14.tgz absorb_write absorb_read h128_write h128_read gqa_write gqa_read h128_write.log precompile.log tests.log && rm -rf absorb_write absorb_read h128_write h128_read gqa_write gqa_read
