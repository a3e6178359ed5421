# (as run; tests/gpu/test_decode_warmup.py is now tests/gpu/test_decode_warmup_gpu.py: the CPU tier has a file of that name, and pytest collects both tiers in one process)
# Device command of run 17 (one H200; carry [".tlkit"]): the load-time warm-up's GPU test after the
# tilelang_absorb fix (its Triton combine variants), then the timeline of the B = 1 absorb cells
# (experiments/timeline, run 3)
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run17; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/precompile.log; tail -n 1 $W/precompile.log
timeout 240 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_decode_warmup.py > $W/tests.log 2>&1; tail -n 3 $W/tests.log
timeout 150 python3 benchmarks/decode_kernels_h200/experiments/timeline/run.py 1,8192,1 1,32768,1 1,32768,2 8,4096,1 1,32768,1,32 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/timeline_run3.log; cat $W/timeline_run3.log
