"""EXPERIMENT (session 6): does the TileLang absorb kernel now beat Triton at 16 query rows?

``tilelang_decode.prefers`` sends sequences with fewer than MIN_ROWS = 32 query rows (heads x
s_q) to the Triton kernel: every TileLang program computes 64 rows, and at 16 rows (the 1B engine
model's 16 heads, plain decode) the session-4 kernel measured 0.90-0.98x Triton end to end. The
kernel is 1.1-1.4x faster since (cheaper mask, select-free softmax), so this times both kernels
at 16 and 32 rows (h_q 16 and 32, s_q 1), split counts from each kernel's own planner, CUDA-graph
replays, L2 flushed (write), in one process.

Run 1 (session 6, ``run1.log``) set ``prefers``: 32+ rows from 32k cached tokens, 16-31 rows from
512k. Run 2 (session 7, ``run2.log``, ``run.py run2``): after the kernel's staged epilogue, which
made short programs cheaper (the grid's B = 1 cells 1.2-1.6x faster), a finer grid of small
batches to place the rule again.

Run (one H200, carry [".tlkit"]): cmd.sh (run 1), cmd2.sh (run 2)
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..", "..")))

from gqla_megatron import bench_decode as bd  # noqa: E402


def main():
    dev = torch.device("cuda")
    flush = bd.L2Flush(dev, "write")
    rates = bd.measure_rates(dev, copy_mib=1024, gemm_n=8192)
    print(f"copy {rates['copy_tbps']:.2f} TB/s", flush=True)
    run2 = sys.argv[1:] == ["run2"]
    batches = (1, 2, 4, 8, 16, 32, 64, 128) if run2 else (1, 8, 32, 128)
    lengths = (1024, 4096, 8192, 32768) if run2 else (4096, 8192, 32768)
    for H in (16, 32):
        shp = bd.Shapes(**dict(bd.SHAPES["llama3-8b"], heads=H))
        for B in batches:
            for L in lengths:
                x = bd.make_inputs("absorb", shp, B, L, 1, torch.bfloat16, dev, 0)
                nbytes = bd.cache_bytes("absorb", shp, B, L, 2) + bd.qo_bytes("absorb", shp, B, 1, 2)
                ts = {}
                for k, m in (("triton", bd._method_triton), ("tilelang", bd._method_tilelang)):
                    fn, _, _ = m("absorb", shp, x)
                    ts[k] = bd.time_graph(fn, dev, warmup=3, iters=20, flush=flush) * 1e6
                print(f"h{H} B={B:3d} L={L:5d} ({B * L // 1024:5d}k tokens): triton {ts['triton']:8.1f} us "
                      f"({nbytes / ts['triton'] / 1e6 / rates['copy_tbps']:4.0%}) | tilelang {ts['tilelang']:8.1f} us "
                      f"({nbytes / ts['tilelang'] / 1e6 / rates['copy_tbps']:4.0%}) | tilelang/triton speed "
                      f"{ts['triton'] / ts['tilelang']:.2f}x", flush=True)
                del x


if __name__ == "__main__":
    main()
