# Device command (one H200; carry [".tlkit"]): end to end after all of session 6's kernel changes (the
# TileLang kernel's softmax work, the 16-row rule, the combine pass's column blocks): plain and MTP
# decode of the 1B model, absorb path, auto (tilelang_absorb) vs triton_absorb vs the stock torch
# backend, CUDA graphs
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/eng10; mkdir -p $W
timeout 420 python3 benchmarks/engine_decode_h200/run.py --budget-s 300 --modes plain_graphs mtp_graphs --backends auto triton torch --paths absorb --batches 8 32 128 --contexts 8192 32768 --out $W > $W/eng.log 2>&1; grep -v "TileLang:" $W/eng.log | grep -c "tok/s"; tail -n 1 $W/eng.log
