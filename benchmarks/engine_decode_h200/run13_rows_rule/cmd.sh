# Device command (one H200; carry [".tlkit"]): after prefers moved (32+ rows from 1k cached tokens,
# 16-31 rows from 256k): GPU tests of the TileLang kernels and of the warm-up, then plain decode
# (16 rows) at 256k cached tokens -- B=32 x 8k, B=8 x 32k, which tilelang_absorb now runs on the
# TileLang kernel -- and MTP decode at B=8 x 8k (64k tokens, 32 rows: TileLang now), auto vs triton.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/eng13; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" | tail -n 1
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py tests/gpu/test_decode_warmup_gpu.py > $W/tests.log 2>&1; tail -n 1 $W/tests.log
timeout 200 python3 benchmarks/engine_decode_h200/run.py --budget-s 120 --modes plain_graphs mtp_graphs --backends auto triton --paths absorb --batches 8 32 --contexts 8192 32768 --out $W > $W/eng.log 2>&1; grep -v "TileLang:" $W/eng.log | grep "tok/s" | sed 's/compiled at load.*//' | cut -c1-140
