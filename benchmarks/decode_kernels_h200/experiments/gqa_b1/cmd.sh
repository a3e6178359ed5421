# Device command (one H200)
W=$OUT/gqa_b1; mkdir -p $W
timeout 400 python3 benchmarks/decode_kernels_h200/experiments/gqa_b1/run.py > $W/run1.log 2>&1; cat $W/run1.log
