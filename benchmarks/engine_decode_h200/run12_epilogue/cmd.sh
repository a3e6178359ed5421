# (as run; tests/gpu/test_decode_warmup.py is now tests/gpu/test_decode_warmup_gpu.py: the CPU tier has a file of that name, and pytest collects both tiers in one process)
# Device command (one H200; carry [".tlkit"]): end to end after session 7's kernel and load changes
# (the TileLang kernel's staged epilogue; Triton and TileLang-combine variants compiled at load,
# only the TileLang kernels the calls use). First the GPU tests of the TileLang kernels and of the
# warm-up (no compile left for any decode step); then plain and MTP decode of the 1B model,
# absorb path, auto (tilelang_absorb) vs triton_absorb vs stock torch, CUDA graphs, as run 10.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/eng12; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" | tail -n 1
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_tilelang_kernels.py tests/gpu/test_decode_warmup.py > $W/tests.log 2>&1; tail -n 1 $W/tests.log
timeout 330 python3 benchmarks/engine_decode_h200/run.py --budget-s 230 --modes plain_graphs mtp_graphs --backends auto triton torch --paths absorb --batches 32 128 --contexts 8192 32768 --out $W > $W/eng.log 2>&1; grep -v "TileLang:" $W/eng.log | grep -c "tok/s"; tail -n 1 $W/eng.log
