# Device command of run 20 (one H200; carry [".tlkit"]), session 8: the 128-head absorb grid timed
# per layer (`--layers 32`, as run 19), write flush.
set -o pipefail
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/run20; mkdir -p $W
timeout 150 python3 scripts/tilelang_precompile.py 2>&1 | grep -v "TileLang:\|Warning: T.vec" > $W/precompile.log; tail -n 1 $W/precompile.log
B="python3 -m gqla_megatron.cli.bench decode --layers 32 --path absorb --kernels triton,tilelang --peers bmm"
timeout 90 $B --shapes h128 --context 4k,32k --out $W/h128 > $W/h128.log 2>&1; tail -n 1 $W/h128.log | cut -c1-120
cd $W && tar czf $OUT/run20.tgz h128 h128.log precompile.log
