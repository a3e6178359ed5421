# Device command (one H200; carry [".tlkit"]), session 9: split partials in bf16 vs fp32 (TileLang
# absorb kernel), one process; the variant's split kernel compiles beside the package precompile.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
E=benchmarks/decode_kernels_h200/experiments/partials_bf16
W=$OUT/partials_bf16; mkdir -p $W
python3 -c "import sys; sys.path.insert(0, '$E'); import variant; variant.load().compile_absorb(r=512, dr=64, dtype='bfloat16', len_dtype='int32', page=0, direct=False)" > $W/variant_compile.log 2>&1 &
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" | tail -n 1
wait
timeout 330 python3 $E/run.py --layers 32 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/run${RUN:-1}.log; cut -c1-240 $W/run${RUN:-1}.log
# run 2 (after the loop moved into ../ab_graphs.absorb_ab): the same command, output run2.log
