"""EXPERIMENT (session 6): the TileLang absorb kernel's fixed cost per call.

Run 14/15's large cells fit time ~= 30 us + 2.05 us per 64-token tile per program (128 programs):
B=128 x 1k / 4k / 8k / 32k and the split cells (B=32 x 8k, 4 splits) all land on that line. The
load-pipeline probe (same producer, barriers, footprint, no math) showed only ~8 us of fixed cost
in the same cells. This times, with B=128 sequences (one program each, direct output) at
L = 64 .. 4096 (1 .. 64 tiles per program): the TileLang kernel, the Triton kernel, and a
one-element kernel, each with no L2 flush and with the write flush, CUDA-graph replays. The
intercept over tiles is the fixed cost.

Run (one H200, carry [".tlkit"]): cmd.sh
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..", "..")))

from gqla_megatron import bench_decode as bd  # noqa: E402


def main():
    dev = torch.device("cuda")
    flushes = {"none": None, "write": bd.L2Flush(dev, "write")}
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    x1 = torch.zeros(1, device=dev)
    for name, f in flushes.items():
        t = bd.time_graph(lambda: x1.add_(1), dev, warmup=3, iters=30, flush=f) * 1e6
        print(f"one-element kernel, flush {name}: {t:.1f} us", flush=True)
    for S in (1, 2):
        for L in (64, 128, 256, 512, 1024, 2048, 4096):
            x = bd.make_inputs("absorb", shp, 128, L, S, torch.bfloat16, dev, 0)
            parts = []
            for kern, m in (("tilelang", bd._method_tilelang), ("triton", bd._method_triton)):
                fn, _, note = m("absorb", shp, x)
                for name, f in flushes.items():
                    t = bd.time_graph(fn, dev, warmup=3, iters=30, flush=f) * 1e6
                    parts.append(f"{kern}/{name} {t:7.1f}")
            print(f"B=128 s_q={S} L={L:5d} ({-(-L // 64):3d} tiles/program, splits {note.get('num_splits')}): "
                  + " | ".join(parts) + " us", flush=True)
            del x


if __name__ == "__main__":
    main()
