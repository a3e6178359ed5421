# Device command (one H200; carry [".tlkit"]) of the experiment's three runs, from commit 38519c8
# (the kernels and runner were removed afterwards; `git checkout 38519c8 -- benchmarks/decode_kernels_h200/experiments/tilelang_ws_absorb`
# restores them). WS_KERNELS picks among ws, ws_a, ws_ad, ws_ade, ss, ss_ef, ss_a.
# run1_ws.log: WS_KERNELS=ws (the runner then had only that kernel)
# run2_ss.log: WS_KERNELS=ws,ss,ss_ef
# run3_async.log: WS_KERNELS=ws,ws_a,ws_ad,ws_ade,ss_a
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/ws; mkdir -p $W
timeout 480 python3 benchmarks/decode_kernels_h200/experiments/tilelang_ws_absorb/run_ws.py 2>&1 | grep -v "TileLang:" > $W/ws.log; tail -40 $W/ws.log
