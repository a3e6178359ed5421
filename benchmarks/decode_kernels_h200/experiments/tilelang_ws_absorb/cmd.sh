# Device command (one H200; carry [".tlkit"]) -- NOT RUN YET: correctness and timing of ws_kernel.py
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/ws; mkdir -p $W
timeout 420 python3 benchmarks/decode_kernels_h200/experiments/tilelang_ws_absorb/run_ws.py 2>&1 | grep -v "TileLang:" > $W/ws.log; tail -30 $W/ws.log
