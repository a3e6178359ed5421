# Device command (one H200; carry [".tlkit"]): plain decode of the 16-head 1B model (16 query rows per
# sequence) after the rows rule changed (session 6: TileLang from 512k cached tokens at 16-31 rows);
# auto (tilelang_absorb, which runs TileLang only where prefers() says so) vs triton_absorb, CUDA graphs
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/eng9; mkdir -p $W
timeout 400 python3 benchmarks/engine_decode_h200/run.py --budget-s 280 --modes plain_graphs --backends auto triton --paths absorb --batches 8 32 128 --contexts 8192 32768 --out $W > $W/eng.log 2>&1; grep -v "TileLang:" $W/eng.log | tail -12 | cut -c1-175
