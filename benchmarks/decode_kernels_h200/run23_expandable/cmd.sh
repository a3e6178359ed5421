# Device command of run 23 (one H200; carry [".tlkit"]), session 9: the per-layer grids of run 22
# again, now with gqla-bench decode's default --allocator expandable (PyTorch's expandable
# segments), which removed the slow first timings after a large free in
# experiments/clock_state (placement_spread).
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run23; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/precompile.log; tail -n 1 $W/precompile.log
B="python3 -m gqla_megatron.cli.bench decode --layers 32"
timeout 100 $B --path gqa --peers sdpa_cudnn,sdpa_efficient --out $W/gqa_layers > $W/gqa_layers.log 2>&1; tail -n 1 $W/gqa_layers.log | cut -c1-100
timeout 100 $B --path absorb --kernels triton,tilelang --peers bmm --out $W/absorb_layers > $W/absorb_layers.log 2>&1; tail -n 1 $W/absorb_layers.log | cut -c1-100
cd $W && tar czf $OUT/run23.tgz gqa_layers absorb_layers *.log
