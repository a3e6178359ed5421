"""The combine pass discarding the split partials' L2 lines after reading them: A/B in one process.

Variants (triton_decode.COMBINE_DISCARD, read at call time, so each graph captures its variant):
  keep     the package default: the partials stay in L2 as dirty lines and are written back to
           HBM when the next kernel's reads evict them (8.4 MB per call at B=8 x 32k absorb s_q 1)
  discard  the combine runs ``discard.global.L2`` on every 128-byte partial line it has read

Per cell: both variants eagerly on two alternating input sets (bitwise equal to keep: a discard
before the reads finished would return stale HBM data), then timed as CUDA-graph replays, the
variants interleaved over --rounds rounds (median of the rounds' medians), L2 flushed (write)
before each replay, one call and per layer of --layers layers (own inputs each, one graph);
after the timing each graph is replayed once more and its first layer's output compared with
the eager result (bitwise).

Usage: python run.py [--rounds 5] [--iters 10] [--layers 32]
"""

import os
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ab_graphs import (capture_layers, cell_inputs, eager_check, graph_errors, make_call, setup,  # noqa: E402
                       time_interleaved)
from gqla_megatron.kernels import triton_decode as td  # noqa: E402

CELLS = [  # (kernel, path, B, L, s_q)
    ("tilelang", "absorb", 8, 32768, 1), ("tilelang", "absorb", 32, 8192, 1),
    ("tilelang", "absorb", 8, 32768, 2), ("tilelang", "absorb", 32, 8192, 2),
    ("tilelang", "absorb", 1, 8192, 1), ("tilelang", "absorb", 1, 32768, 1),
    ("tilelang", "absorb", 8, 4096, 1), ("tilelang", "absorb", 32, 4096, 1),
    ("triton", "gqa", 1, 8192, 1), ("triton", "gqa", 1, 32768, 1), ("triton", "gqa", 8, 8192, 1),
    ("triton", "absorb", 32, 8192, 1),
]
VARIANTS = {"keep": False, "discard": True}


def main():
    args, dev, shp, flush, copy_tbps = setup(32)
    for kernel, path, B, L, S in CELLS:
        need, n_layers, xs = cell_inputs(path, shp, B, L, S, dev, args.layers)
        ref, errs, note = eager_check(kernel, path, shp, xs, dev, list(VARIANTS),
                                      lambda v: setattr(td, "COMBINE_DISCARD", VARIANTS[v]))
        graphs, keep = {}, []
        for v, flag in VARIANTS.items():
            td.COMBINE_DISCARD = flag
            calls = [make_call(kernel, path, shp, x)[0] for x in xs[:n_layers]]
            keep.append(calls)   # the closures own the output buffers the graphs write
            graphs.update(capture_layers(v, calls, dev))
        td.COMBINE_DISCARD = False
        res = time_interleaved(graphs, dev, flush, rounds=args.rounds, iters=args.iters)
        graph_err = graph_errors(graphs, ref[0], dev)
        copy_us = need / (copy_tbps * 1e12) * 1e6
        line = [f"{kernel:8s} {path:6s} B={B:3d} L={L:6d} s_q={S} splits={note['num_splits']:3d} layers={n_layers:2d}"]
        for mode in sorted({k[1] for k in res}):
            b, d = res[("keep", mode)], res[("discard", mode)]
            line.append(f"  [{'1 call' if mode == 1 else 'per layer'}] keep {b:7.1f}us ({100 * copy_us / b:3.0f}%)"
                        f"  discard {d:7.1f}us ({100 * copy_us / d:3.0f}%) x{b / d:.3f}")
        line.append(f"  max |diff| vs keep: eager {errs['discard']:.1e}; graphs "
                    + ", ".join(f"{v}/{n} {e:.1e}" for (v, n), e in graph_err.items()))
        print("\n".join(line), flush=True)
        del xs, graphs, keep
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
