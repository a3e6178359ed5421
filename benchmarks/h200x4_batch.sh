#!/usr/bin/env bash
# One device call on nvidia-h200-x4 that runs independent GPU jobs side by side, one GPU each
# (decode and conversion figures are per GPU; the jobs share only the host).
#   run (device tool, kind nvidia-h200-x4, carry .devkit):  bash benchmarks/h200x4_batch.sh <jobs...>
# jobs: gputests engine convert8b tpdiag fp8mbs8 kernels, all started at once; "then" waits for
# the jobs started so far. Logs: $OUT/<job>.log
set -u
source .devkit/setup.sh
export PYTHONUNBUFFERED=1
job() {  # name gpus command...
  local name=$1 gpus=$2; shift 2
  ( CUDA_VISIBLE_DEVICES=$gpus timeout "${JOB_TIMEOUT:-520}" bash -c "$*" > "$OUT/$name.log" 2>&1;
    echo "[$name rc=$?]" >> "$OUT/$name.log" ) &
}
for j in "$@"; do case $j in
  then) wait ;;
  gputests) job gputests 0 "NVIDIA_TF32_OVERRIDE=0 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu" ;;
  kernels) job kernels 0 "python3 -m gqla_megatron.cli.bench decode --out $OUT/decode_kernels ${KERNEL_ARGS:-}" ;;
  engine) job engine 1 "python3 benchmarks/engine_decode_h200/run.py --out $OUT/engine_decode ${ENGINE_ARGS:-}" ;;
  convert8b) job convert8b ${CONVERT_GPU:-2} "python3 benchmarks/conversion_8b_h200/bench_convert_8b.py --device cuda --results $OUT/conversion_8b" ;;
  tpdiag) job tpdiag 2,3 "nvidia-smi topo -m; python3 -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/nccl_probe.py --out $OUT/tpdiag && CUDA_DEVICE_MAX_CONNECTIONS=1 python3 benchmarks/train_scaling.py --gpus 2 --attention gqla gqa --layouts 2x1 --tag _cdmc1 --out $OUT/tpdiag" ;;
  fp8mbs8) job fp8mbs8 ${FP8_GPU:-3} "python3 benchmarks/fp8_profile.py --layers 4 --iters 6 --micro-batch-size 8 --rope-fusion off --out $OUT/fp8_mbs8" ;;
esac; done
wait
tail -n 25 "$OUT"/*.log
