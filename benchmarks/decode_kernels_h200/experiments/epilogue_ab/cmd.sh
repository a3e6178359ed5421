# Local step (needs git): the previous kernel, for the A/B
#   git show 8ad831b:gqla_megatron/kernels/tilelang_decode.py > benchmarks/decode_kernels_h200/experiments/epilogue_ab/old_kernel.py
# Device command (one H200; carry [".tlkit"])
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/ab; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | tail -n 1
timeout 150 python3 -m pytest tests/gpu/test_tilelang_kernels.py -q -x 2>&1 | tail -n 5 > $W/tests.log; cat $W/tests.log
timeout 200 python3 benchmarks/decode_kernels_h200/experiments/epilogue_ab/run.py 2>&1 | grep -v "TileLang:" > $W/run1.log; cat $W/run1.log
timeout 120 python3 benchmarks/decode_kernels_h200/experiments/timeline/run.py 2>&1 | grep -v "TileLang:" > $W/timeline_run2.log; cat $W/timeline_run2.log
