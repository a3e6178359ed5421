# Device command (one H200; carry [".tlkit"]); part of run 14's command
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/l2; mkdir -p $W
OUT=$W timeout 120 python3 benchmarks/decode_kernels_h200/experiments/l2_flush/run.py > $W/run.log 2>&1; grep -v "TileLang:" $W/run.log | cut -c1-175
