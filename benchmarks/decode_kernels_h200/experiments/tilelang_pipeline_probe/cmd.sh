# Device command (one H200; carry [".tlkit"]): the load-pipeline probe (see probe.py's docstring)
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/probe; mkdir -p $W
timeout 230 python3 benchmarks/decode_kernels_h200/experiments/tilelang_pipeline_probe/probe.py 2>&1 | grep -v "TileLang:" > $W/probe.log; tail -12 $W/probe.log
