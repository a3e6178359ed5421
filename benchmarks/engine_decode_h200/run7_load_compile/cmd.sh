# Device command (one H200; carry [".tlkit"]): kernels compiled at engine load (session 6). One cell,
# B=32 x 32k, CUDA graphs, plain (16 query rows per sequence: the Triton kernel serves it, nothing to
# compile) and MTP speculative (s_q 2 = 32 rows: tilelang_absorb, its kernels compiled at load on this
# fresh machine); load time and first-step time are in the log and results.json.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/eng7; mkdir -p $W
timeout 300 python3 benchmarks/engine_decode_h200/run.py --budget-s 200 --modes mtp_graphs plain_graphs --backends auto --paths absorb --batches 32 --contexts 32768 --out $W > $W/eng.log 2>&1; grep -v "TileLang:" $W/eng.log | tail -8
