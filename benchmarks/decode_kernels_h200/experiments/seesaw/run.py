"""The seesaw schedule of the TileLang absorb kernel (both consumer warpgroups compute the scores
and softmax of alternate tiles and half of every tile's output) vs the package's schedule (one
warpgroup computes every tile's scores and softmax and the left half of the output, the other the
right half): A/B in one process.

Variants (tilelang_decode.SEESAW, read per call, so each graph captures its variant):
  one     build_absorb_program
  seesaw  build_absorb_seesaw_program

Checks first: ragged lengths, outputs NaN-filled, queries at scale 1 and 8, both variants against
float64 attention (max |error|), 32 and 128 heads, split and direct. Then per cell both variants
timed as CUDA-graph replays, interleaved over --rounds rounds (median of the rounds' medians), L2
flushed (write) before each replay, one call and per layer of --layers layers (own inputs each,
one graph); after timing each graph is replayed once more and its first layer's output compared
with the eager result of the package schedule.

Usage: python run.py [--rounds 5] [--iters 10] [--layers 32]
"""

import os
import sys

import torch

sys.path.insert(0, ".")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from ab_graphs import absorb_reference, capture, cell_inputs, setup, time_interleaved  # noqa: E402
from gqla_megatron import bench_decode as bd  # noqa: E402
from gqla_megatron.kernels import tilelang_decode as tld  # noqa: E402

CHECKS = [  # (shapes, B, L, s_q, splits or None = the planner's)
    ("llama3-8b", 1, 32768, 1, None), ("llama3-8b", 8, 8192, 2, None), ("llama3-8b", 4, 4096, 1, 7),
    ("llama3-8b", 3, 1000, 1, 1), ("h128", 2, 8192, 1, None), ("h128", 3, 1000, 2, 1),
]
CELLS = [  # (shapes, B, L, s_q)
    ("llama3-8b", 8, 32768, 1), ("llama3-8b", 32, 8192, 1), ("llama3-8b", 8, 32768, 2),
    ("llama3-8b", 32, 8192, 2), ("llama3-8b", 1, 8192, 1), ("llama3-8b", 1, 32768, 1),
    ("llama3-8b", 128, 8192, 1), ("llama3-8b", 128, 8192, 2), ("llama3-8b", 8, 4096, 1),
    ("h128", 32, 32768, 1), ("h128", 128, 4096, 1), ("h128", 8, 32768, 1), ("h128", 32, 4096, 2),
    ("h128", 128, 4096, 2), ("h128", 8, 4096, 2), ("h128", 1, 32768, 1),
]
VARIANTS = {"one": False, "seesaw": True}


def call(x):
    out = torch.empty_like(x["q"])
    return lambda: tld.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"],
                                     out=out, max_len=x["L"], validate=False)


def checks(dev):
    for name, B, L, S, ns in CHECKS:
        shp = bd.Shapes(**bd.SHAPES[name])
        for q_scale in (1.0, 8.0):
            x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0, seed=1)
            x["q"] = (x["q"].float() * q_scale).to(x["q"].dtype)
            x["lengths"] = torch.randint(L // 2, L - S + 1, (B,), device=dev, dtype=x["lengths"].dtype)
            ref = absorb_reference(x, S, shp.heads)
            n = ns or tld.plan_splits(B, S * shp.heads, L, dev)
            line = f"check {name:9s} B={B} L={L} s_q={S} splits={n:3d} q x{q_scale:.0f}: max |ref| {ref.abs().max().item():.2e}"
            for v, flag in VARIANTS.items():
                tld.SEESAW = flag
                o = torch.full_like(x["q"], float("nan"))
                tld.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"], out=o,
                                  num_splits=n)
                err = (o.double() - ref).abs()
                line += f"  {v}: max err {err.max().item():.2e} mean {err.mean().item():.2e}"
            tld.SEESAW = False
            print(line, flush=True)
            del x, ref


def main():
    args, dev, _, flush, copy_tbps = setup(32)
    checks(dev)
    for name, B, L, S in CELLS:
        shp = bd.Shapes(**bd.SHAPES[name])
        need, n_layers, xs = cell_inputs("absorb", shp, B, L, S, dev, args.layers)
        ref = call(xs[0])().clone()
        eager, graphs, keep = {}, {}, []
        for v, flag in VARIANTS.items():
            tld.SEESAW = flag
            eager[v] = (call(xs[0])().float() - ref.float()).abs().max().item()
            calls = [call(x) for x in xs[:n_layers]]
            keep.append(calls)   # the closures own the output buffers the graphs write
            graphs[(v, 1)] = capture(calls[0], dev)
            if n_layers > 1:
                graphs[(v, n_layers)] = capture(lambda calls=calls: [c() for c in calls], dev)
        tld.SEESAW = False
        res = time_interleaved(graphs, dev, flush, rounds=args.rounds, iters=args.iters)
        graph_err = {}
        for (v, n), (g, out) in graphs.items():
            g.replay()
            torch.cuda.synchronize(dev)
            first = out if n == 1 else out[0]
            graph_err[(v, n)] = (first.float() - ref.float()).abs().max().item()
        copy_us = need / (copy_tbps * 1e12) * 1e6
        nsplit = tld.plan_splits(B, S * shp.heads, L, dev)
        line = [f"{name:9s} B={B:3d} L={L:6d} s_q={S} splits={nsplit:3d} layers={n_layers:2d}"]
        for mode in sorted({k[1] for k in res}):
            a, b = res[("one", mode)], res[("seesaw", mode)]
            fl = bd.flops("absorb", shp, B, L, S) / 1e6   # MFLOP -> TFLOP/s with us
            line.append(f"  [{'1 call' if mode == 1 else 'per layer'}] one {a:7.1f}us ({100 * copy_us / a:3.0f}% copy, "
                        f"{fl / a:4.0f} TFLOP/s)  seesaw {b:7.1f}us ({100 * copy_us / b:3.0f}% copy, {fl / b:4.0f} "
                        f"TFLOP/s) x{a / b:.3f}")
        line.append("  max |diff| vs one eager: eager " + ", ".join(f"{v} {e:.1e}" for v, e in eager.items())
                    + "; graphs " + ", ".join(f"{v}/{n} {e:.1e}" for (v, n), e in graph_err.items()))
        print("\n".join(line), flush=True)
        g = out = first = None
        del xs, graphs, keep, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
