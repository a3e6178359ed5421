# Device command of run 22 (one H200; carry [".tlkit"]), session 9: the whole grid on the current
# kernels (the TileLang split planner of session 8 included, which runs 18-20 predate), one call
# and per layer of 32, write flush; each decode_bench.md now ends with issue #6's targets, and
# `gqla-bench targets` (local, after the run) gathers them in ../targets.md.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run22; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/precompile.log; tail -n 1 $W/precompile.log
for mode in call layers; do
  B="python3 -m gqla_megatron.cli.bench decode"; [ $mode = layers ] && B="$B --layers 32"
  timeout 100 $B --path absorb --kernels triton,tilelang --peers bmm --out $W/absorb_$mode > $W/absorb_$mode.log 2>&1; tail -n 1 $W/absorb_$mode.log | cut -c1-100
  timeout 90 $B --path gqa --peers sdpa_cudnn,sdpa_efficient --out $W/gqa_$mode > $W/gqa_$mode.log 2>&1; tail -n 1 $W/gqa_$mode.log | cut -c1-100
  timeout 90 $B --path absorb --kernels triton,tilelang --peers bmm --shapes h128 --context 4k,32k --out $W/h128_$mode > $W/h128_$mode.log 2>&1; tail -n 1 $W/h128_$mode.log | cut -c1-100
done
cd $W && tar czf $OUT/run22.tgz absorb_call absorb_layers gqa_call gqa_layers h128_call h128_layers *.log
