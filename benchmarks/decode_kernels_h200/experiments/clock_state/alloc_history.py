"""Does the allocation history of the process change a memory-bound cell's time? gqa B=32 x 32k
s_q 1 (and B=32 x 8k) timed as the grid times it (graph replay, write flush, median of 10):
(a) on fresh inputs in a fresh process; (d) on new inputs made while 14 other caches (14.4 GiB, as
two 7-layer cells hold) are allocated; (b) on new inputs made after those were freed
(torch.cuda.empty_cache); (c) on (a)'s inputs again. (The log's "(d)" label said 4 GiB: it was
14.4 GiB.)"""

import sys

import torch

sys.path.insert(0, ".")
from gqla_megatron import bench_decode as bd  # noqa: E402

dev = torch.device("cuda")
shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
flush = bd.L2Flush(dev, "write")


def timed(x):
    fn = bd._method_triton("gqa", shp, x)[0]
    return bd.time_graph(fn, dev, warmup=3, iters=10, flush=flush) * 1e6


def make(B, L, seed=0):
    return bd.make_inputs("gqa", shp, B, L, 1, torch.bfloat16, dev, 0, seed=seed)


for B, L in ((32, 32768), (32, 8192)):
    xa = make(B, L)
    ta = timed(xa)
    other = [make(32, 8192, seed=s) for s in range(1, 8)]     # 7 x 1.03 GiB of caches, as a 7-layer cell
    other += [make(8, 32768, seed=s) for s in range(1, 8)]    # and 7 x 1.03 GiB more (14.4 GiB)
    xd = make(B, L, seed=50)
    td_ = timed(xd)
    del other, xd
    torch.cuda.empty_cache()
    xb = make(B, L, seed=99)
    tb = timed(xb)
    tc = timed(xa)
    print(f"gqa B={B} L={L}: (a) fresh {ta:7.1f} us  (b) after alloc+free, new inputs {tb:7.1f} us  "
          f"(c) (a)'s inputs again {tc:7.1f} us  (d) new inputs while 14 GiB held {td_:7.1f} us", flush=True)
    del xa, xb
    torch.cuda.empty_cache()
