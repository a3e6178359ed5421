# Device command (one H200; carry [".tlkit"]): TileLang GPU tests (graph capture, backend), then the
# engine's absorb decode with auto (= tilelang_absorb on an H200 in bf16) beside triton_absorb
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/eng4; mkdir -p $W
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py -k "capture or backend" > $W/tests.log 2>&1; tail -4 $W/tests.log
timeout 330 python3 benchmarks/engine_decode_h200/run.py --budget-s 240 --modes plain_graphs --backends auto triton --paths absorb --out $W > $W/eng.log 2>&1; grep -v "TileLang:" $W/eng.log | tail -30
