# (as run, session 8, at commit 158ff4d -- the commit that added triton_decode.COMBINE_PDL and
# tilelang_decode.PDL_TRIGGER; both were removed again in the next commit, so run.py needs that
# commit's package: `git checkout 158ff4d -- gqla_megatron/kernels`). Part of
# ../../run19_layers/cmd.sh (one H200; carry [".tlkit"]):
source scripts/tilelang_kit_setup.sh || exit 1
timeout 150 python3 scripts/tilelang_precompile.py
timeout 240 python3 benchmarks/decode_kernels_h200/experiments/pdl_combine/run.py --layers 32 > run1.log 2>&1
