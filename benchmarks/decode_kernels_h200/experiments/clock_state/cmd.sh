# Device command (one H200; carry [".tlkit"]), session 9: is the run-to-run spread of the largest
# cells (gqa B=32 x 32k: 1052 us in run 22's one-call grid, 1197 us in its per-layer grid, where
# that cell ran as one layer -- the same measurement) the GPU's clock state? The same single-call
# cells timed (A) on a fresh machine, (B) right after the per-layer gqa grid, (C) after a 20 s
# rest, while nvidia-smi logs clocks, power, temperature and throttle reasons every 100 ms.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/clock_state; mkdir -p $W
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,temperature.memory,clocks_throttle_reasons.active --format=csv -lms 100 > $W/smi.csv 2>&1 &
SMI=$!
B="python3 -m gqla_megatron.cli.bench decode"
cells() {  # $1 = tag
  date +"%T.%N $1 start" >> $W/marks.txt
  $B --path gqa --batch 32,128 --context 8k,32k --s-q 1 --peers sdpa_cudnn --out $W/gqa_$1 > $W/gqa_$1.log 2>&1
  $B --path absorb --shapes h128 --batch 32 --context 32k --s-q 1 --kernels tilelang --peers '' --out $W/h128_$1 > $W/h128_$1.log 2>&1
  date +"%T.%N $1 end" >> $W/marks.txt
  grep -h "^\[" $W/gqa_$1.log $W/h128_$1.log | cut -c1-110
}
cells A_fresh
date +"%T.%N grid start" >> $W/marks.txt
timeout 120 $B --layers 32 --path gqa --peers sdpa_cudnn,sdpa_efficient --out $W/grid_layers > $W/grid_layers.log 2>&1
date +"%T.%N grid end" >> $W/marks.txt
grep -h "B=32 L=32768 s_q=1\|B=128 L=8192 s_q=1" $W/grid_layers.log | cut -c1-110
cells B_after_grid
sleep 20
cells C_rested
kill $SMI
cd $W && tar czf $OUT/clock_state.tgz .
# run 2 (same session, separate device call): allocation history in one process
#   source scripts/tilelang_kit_setup.sh; python3 benchmarks/decode_kernels_h200/experiments/clock_state/alloc_history.py | tee $OUT/alloc_history.log
# run 3 (separate device call): placements, default allocator and expandable segments
#   source scripts/tilelang_kit_setup.sh; python3 scripts/tilelang_precompile.py | tail -n 1; E=benchmarks/decode_kernels_h200/experiments/clock_state
#   python3 $E/placement_spread.py | tee $OUT/placement_default.log
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 $E/placement_spread.py | tee $OUT/placement_expandable.log
# run 4 (separate device call): source scripts/tilelang_kit_setup.sh; python3 benchmarks/decode_kernels_h200/experiments/clock_state/graph_tied.py | tee $OUT/graph_tied.log
