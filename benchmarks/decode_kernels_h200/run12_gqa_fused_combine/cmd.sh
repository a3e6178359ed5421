# Device command of run 12 (one H200; no carry needed), run twice: the gqa kernel's fused combine
# (the last program of each unit merges the splits; one launch per decode step), in the form of
# commit 7809a9b (call1_tile/) and of commit 595866e (call2_rowwise/). Both measured slower than
# the separate combine kernel and were reverted; check out either commit to rerun. GPU tests of the Triton
# kernels (gqa + capture + the contention test), then the gqa grid with the fused combine (the
# default) and with the separate combine kernel (GQLA_DECODE_GQA_FUSED_COMBINE=0), no peers.
set -o pipefail
W=$OUT/run12; mkdir -p $W
timeout 240 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_triton_kernels.py -k "gqa or capture or contention" -x > $W/tests.log 2>&1; tail -3 $W/tests.log
B="python3 -m gqla_megatron.cli.bench decode --path gqa --peers="
timeout 90 $B --out $W/fused > $W/fused.log 2>&1; grep "gqa B=" $W/fused.log | cut -c1-110
GQLA_DECODE_GQA_FUSED_COMBINE=0 timeout 90 $B --out $W/separate > $W/separate.log 2>&1; grep "gqa B=" $W/separate.log | cut -c1-110
cd $W && tar czf $OUT/run12.tgz fused separate && rm -rf fused separate
