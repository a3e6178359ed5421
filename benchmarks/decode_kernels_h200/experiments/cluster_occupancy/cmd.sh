# (session 8; one H200) the cluster occupancy probe: how many clusters of 2-16 whole-SM CTAs fit
# (run 1 also printed nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm,power.limit first)
nvcc -O2 -arch=sm_90a -o /tmp/probe benchmarks/decode_kernels_h200/experiments/cluster_occupancy/probe.cu && /tmp/probe
