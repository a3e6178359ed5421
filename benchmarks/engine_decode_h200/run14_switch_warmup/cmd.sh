# Device command (one H200; carry [".tlkit"]), session 8: the warm-up GPU tests after switch_path
# converts into the engine's own contiguous layouts (new test: no Triton compile in the decode
# steps after a mid-generation path switch, both directions).
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/eng14; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" | tail -n 1
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_decode_warmup_gpu.py tests/gpu/test_triton_kernels.py -k "switch or warmup or compile or engine" > $W/tests.log 2>&1; tail -n 3 $W/tests.log
