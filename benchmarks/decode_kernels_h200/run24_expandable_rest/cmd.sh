# Device command of run 24 (one H200; carry [".tlkit"]), session 9: the rest of run 22's grids
# (one call: absorb, gqa, 128 heads; per layer: 128 heads) under the bench's new default
# --allocator expandable, so that targets.md rests on grids free of the allocator transient.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run24; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/precompile.log; tail -n 1 $W/precompile.log
B="python3 -m gqla_megatron.cli.bench decode"
timeout 100 $B --path absorb --kernels triton,tilelang --peers bmm --out $W/absorb_call > $W/absorb_call.log 2>&1; tail -n 1 $W/absorb_call.log | cut -c1-100
timeout 90 $B --path gqa --peers sdpa_cudnn,sdpa_efficient --out $W/gqa_call > $W/gqa_call.log 2>&1; tail -n 1 $W/gqa_call.log | cut -c1-100
for mode in call layers; do
  L=""; [ $mode = layers ] && L="--layers 32"
  timeout 90 $B $L --path absorb --kernels triton,tilelang --peers bmm --shapes h128 --context 4k,32k --out $W/h128_$mode > $W/h128_$mode.log 2>&1; tail -n 1 $W/h128_$mode.log | cut -c1-100
done
cd $W && tar czf $OUT/run24.tgz absorb_call gqa_call h128_call h128_layers *.log
