# Device command of run 19 (one H200; carry [".tlkit"]), session 8: (1) experiments/pdl_combine
# (combine pass launched with programmatic dependent launch; A/B in one process, one call and per
# layer of 32), (2) the absorb and gqa grids timed per layer (`gqla-bench decode --layers 32`:
# 32 layers' own inputs back to back in one graph, time / 32; write flush as runs 14-18).
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run19; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/precompile.log; tail -n 1 $W/precompile.log
timeout 240 python3 benchmarks/decode_kernels_h200/experiments/pdl_combine/run.py --layers 32 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/pdl_combine.log; cat $W/pdl_combine.log | cut -c1-160
B="python3 -m gqla_megatron.cli.bench decode --layers 32"
timeout 120 $B --path absorb --kernels triton,tilelang --peers bmm --out $W/absorb > $W/absorb.log 2>&1; tail -n 1 $W/absorb.log | cut -c1-120
timeout 90 $B --path gqa --peers sdpa_cudnn,sdpa_efficient --out $W/gqa > $W/gqa.log 2>&1; tail -n 1 $W/gqa.log | cut -c1-120
cd $W && tar czf $OUT/run19.tgz absorb gqa absorb.log gqa.log precompile.log pdl_combine.log
