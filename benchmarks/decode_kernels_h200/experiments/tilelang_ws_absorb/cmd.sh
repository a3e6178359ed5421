# Device command (one H200; carry [".tlkit"]): correctness of the experiment's kernels vs fp64, then
# timing beside the package's TileLang kernel and Triton. WS_KERNELS picks among ws, ss, ss_ef.
# run1_ws.log: session 5, ws only (the script then had only that kernel);
# run2_ss.log: WS_KERNELS=ws,ss,ss_ef; run3_async.log: WS_KERNELS=ws,ws_a,ws_ad,ws_ade,ss_a
source scripts/tilelang_kit_setup.sh || exit 1
W=$OUT/ws; mkdir -p $W
timeout 480 python3 benchmarks/decode_kernels_h200/experiments/tilelang_ws_absorb/run_ws.py 2>&1 | grep -v "TileLang:" > $W/ws.log; tail -40 $W/ws.log
