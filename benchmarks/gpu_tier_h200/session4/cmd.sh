# Device command (one H200; carry [".tlkit"]): the GPU tests that need neither megatron-core nor
# TE, after the backend registry put tilelang_absorb first for the absorb path.
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/gpu4; mkdir -p $W
for t in test_tilelang_kernels test_engine_cuda_graphs test_triton_kernels; do
  timeout ${T_S:-200} python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/$t.py > $W/$t.log 2>&1
  echo "$t: $(tail -1 $W/$t.log)"
done
