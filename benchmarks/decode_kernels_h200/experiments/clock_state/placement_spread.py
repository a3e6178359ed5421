"""How widely does a memory-bound cell's time spread over placements of its inputs? For each cell,
8 input sets made one after another in one process (the first 4 kept alive, so each lands in new
memory; then all freed with torch.cuda.empty_cache() and 4 more made, each freed before the next):
the package kernel timed on each as the grid times it (graph replay, write flush, median of 10),
and each set timed again at the end of its round (same tensors: the measurement's own spread).
Run it once as is and once with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True."""

import os
import sys

import torch

sys.path.insert(0, ".")
from gqla_megatron import bench_decode as bd  # noqa: E402

dev = torch.device("cuda")
shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
flush = bd.L2Flush(dev, "write")
CELLS = [("gqa", "triton", 32, 32768), ("absorb", "tilelang", 128, 8192)]


def timed(path, kernel, x):
    method = bd._method_tilelang if kernel == "tilelang" else bd._method_triton
    fn = method(path, shp, x)[0]
    return bd.time_graph(fn, dev, warmup=3, iters=10, flush=flush) * 1e6


print(f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}", flush=True)
for path, kernel, B, L in CELLS:
    first, again = [], []
    held = []
    for i in range(4):                      # kept alive: each set in new memory
        x = bd.make_inputs(path, shp, B, L, 1, torch.bfloat16, dev, 0, seed=i)
        held.append(x)
        first.append(timed(path, kernel, x))
    again += [timed(path, kernel, x) for x in held]
    del held, x
    torch.cuda.empty_cache()
    for i in range(4, 8):                   # each freed before the next is made
        x = bd.make_inputs(path, shp, B, L, 1, torch.bfloat16, dev, 0, seed=i)
        first.append(timed(path, kernel, x))
        again.append(timed(path, kernel, x))
        del x
        torch.cuda.empty_cache()
    print(f"{kernel} {path} B={B} L={L}: placements " + " ".join(f"{t:.0f}" for t in first)
          + f" us (max/min {max(first) / min(first):.3f}); same tensors again "
          + " ".join(f"{t:.0f}" for t in again), flush=True)
