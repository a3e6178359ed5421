"""Split counts of the small cells timed per layer: do B = 1 / B = 8 want other splits when the
graph launch is paid once per step?

For each cell, the package's split count (first) and a few others, each timed as one call and per
layer of --layers layers (own inputs each, one graph), interleaved over --rounds rounds, write
flush before each replay; every split count's output is first checked against the package
split count's (bf16: max |diff| reported, different split counts round differently).

Run 1: the package's rule then (two tiles per program at least, rounding ignored) against
others. Run 2 ran with the planner scoring whole tiles down to one tile per program for every
row count (commit of "TileLang split planner: one 64-token tile ..."): "(package)" there is that
rule; it lost with 64-row programs, so the shipped rule applies it only up to 32 rows.

Usage: python run.py [--run2] [--rounds 5] [--iters 10] [--layers 32]  (--run2: the CELLS_RUN2 list)
"""

import os
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ab_graphs import capture_layers, cell_inputs, setup, time_interleaved  # noqa: E402
from gqla_megatron import bench_decode as bd  # noqa: E402
from gqla_megatron.kernels import tilelang_decode as tld  # noqa: E402
from gqla_megatron.kernels import triton_decode as td  # noqa: E402

CELLS = [  # (kernel, path, B, L, s_q, other split counts[, shapes]); run 1: the first six
    ("tilelang", "absorb", 1, 4096, 1, (16, 64)),
    ("tilelang", "absorb", 1, 8192, 1, (32, 96, 128)),
    ("tilelang", "absorb", 1, 32768, 1, (64, 96, 132)),
    ("tilelang", "absorb", 8, 8192, 1, (8, 12)),
    ("triton", "gqa", 1, 8192, 1, (8, 16, 64, 96)),
    ("triton", "gqa", 1, 32768, 1, (16, 64, 96)),
]
CELLS_RUN2 = [  # --run2, after the TileLang planner change (min_chunk 64, whole tiles scored):
    # the package's new split count vs the earlier rule's, in the cells where they differ
    ("tilelang", "absorb", 1, 1024, 1, (8,)),
    ("tilelang", "absorb", 1, 2048, 1, (16,)),
    ("tilelang", "absorb", 1, 4096, 2, (31,)),
    ("tilelang", "absorb", 1, 8192, 2, (61,)),
    ("tilelang", "absorb", 2, 4096, 1, (31,)),
    ("tilelang", "absorb", 2, 8192, 1, (61,)),
    ("tilelang", "absorb", 2, 32768, 1, (63,)),
    ("tilelang", "absorb", 4, 2048, 1, (16,)),
    ("tilelang", "absorb", 4, 4096, 1, (31,)),
    ("tilelang", "absorb", 8, 1024, 1, (8,)),
    ("tilelang", "absorb", 8, 1024, 2, (8,)),
    ("tilelang", "absorb", 1, 4096, 1, (31,), "h128"),
    ("tilelang", "absorb", 1, 8192, 1, (61,), "h128"),
    ("tilelang", "absorb", 1, 32768, 1, (63,), "h128"),
    ("tilelang", "absorb", 2, 4096, 1, (31,), "h128"),
]


def make(kernel, path, x, shp, nsplit):
    """(call with nsplit splits -- None = the package's choice, the split count it used)."""
    if kernel == "tilelang":
        out = torch.empty_like(x["q"])
        n = nsplit or tld.plan_splits(x["B"], x["S"] * shp.heads, x["L"], x["q"].device)
        return (lambda: tld.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"],
                                          out=out, num_splits=n, max_len=x["L"], validate=False)), n
    out = torch.empty(x["q"].shape[:3] + (shp.v_head_dim,), dtype=x["q"].dtype, device=x["q"].device)
    cfg = td.DecodeKernelConfig(num_splits=nsplit) if nsplit else None
    plan = td.plan_decode("gqa", batch=x["B"], s_q=x["S"], heads=shp.heads, groups=shp.groups, max_len=x["L"],
                          dtype=x["q"].dtype, device=x["q"].device, config=cfg)
    return (lambda: td.gqa_decode(x["q"], x["q_rope"], x["k_nope"], x["v"], x["k_rope"], x["lengths"],
                                  x["scale"], out=out, config=cfg, max_len=x["L"], validate=False)), plan.num_splits


def main():
    run2 = "--run2" in sys.argv
    if run2:
        sys.argv.remove("--run2")
    args, dev, shp0, flush, copy_tbps = setup(32)
    for kernel, path, B, L, S, others, *name in (CELLS_RUN2 if run2 else CELLS):
        shp = bd.Shapes(**bd.SHAPES[name[0]]) if name else shp0
        need, n_layers, xs = cell_inputs(path, shp, B, L, S, dev, args.layers)
        graphs, keep, diffs, counts = {}, [], {}, {}
        for v in (None,) + others:
            calls = [make(kernel, path, x, shp, v) for x in xs[:n_layers]]
            counts[v] = calls[0][1]
            o = calls[0][0]().float()
            if v is None:
                ref = o
            diffs[v] = (o - ref).abs().max().item()
            fns = [c for c, _ in calls]
            keep.append(fns)
            graphs.update(capture_layers(v, fns, dev))
        res = time_interleaved(graphs, dev, flush, rounds=args.rounds, iters=args.iters)
        copy_us = need / (copy_tbps * 1e12) * 1e6
        print(f"{kernel:8s} {path:6s} B={B:3d} L={L:6d} s_q={S} heads={shp.heads} layers={n_layers}")
        for v in (None,) + others:
            parts = [f"{'1 call' if m == 1 else 'per layer'} {res[(v, m)]:6.1f}us ({100 * copy_us / res[(v, m)]:3.0f}%)"
                     for m in sorted({k[1] for k in res})]
            print(f"  splits {counts[v]:4d}{' (package)' if v is None else '          '}  " + "  ".join(parts)
                  + f"  max |diff| vs package {diffs[v]:.1e}", flush=True)
        del xs, graphs, keep
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
