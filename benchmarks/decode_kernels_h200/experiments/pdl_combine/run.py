"""Programmatic dependent launch (PDL) for the combine pass of split decode calls: A/B in one process.

Variants (module flags read at call time, so each graph captures its variant's launches):
  base      combine launched normally after the split kernel (the package default)
  pdl       combine launched with launch_pdl=True and griddepcontrol.wait before its loads
            (triton_decode.COMBINE_PDL): its launch may overlap the split kernel's drain
  pdl+trig  TileLang only: also the split kernel signals launch_dependents on entry
            (tilelang_decode.PDL_TRIGGER), so the combine launches once all programs run

Per cell: each variant checked eagerly against base on two alternating input sets (bitwise; a
combine that read partials before they were written would return the other input's result, as
the partial buffers are reused), then timed as CUDA-graph replays, variants interleaved over
--rounds rounds (median of the rounds' medians), L2 flushed (write) before each replay, in two
modes: one call, and per layer of --layers layers (own inputs each) in one graph.

Usage: python run.py [--rounds 5] [--iters 10] [--layers 16]

Run 1 (run1.log) had a bug fixed after it: the graphs' output buffers (owned by the call
closures) were not kept alive after capture, so replays could write into freed memory. (Since
then the capture and timing helpers live in ../ab_graphs.py, shared with combine_discard.) That run
ended with an illegal memory access in the third cell; whether that came from this bug or from
PDL was not isolated (the flags were removed: no gain to chase).
"""

import os
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ab_graphs import capture_layers, cell_inputs, eager_check, make_call, setup, time_interleaved  # noqa: E402
from gqla_megatron.kernels import tilelang_decode as tld  # noqa: E402
from gqla_megatron.kernels import triton_decode as td  # noqa: E402

CELLS = [  # (kernel, path, B, L, s_q)
    ("tilelang", "absorb", 1, 8192, 1), ("tilelang", "absorb", 1, 32768, 1),
    ("tilelang", "absorb", 8, 4096, 1), ("tilelang", "absorb", 8, 32768, 1),
    ("tilelang", "absorb", 32, 1024, 1), ("tilelang", "absorb", 32, 8192, 1),
    ("tilelang", "absorb", 8, 32768, 2), ("tilelang", "absorb", 32, 8192, 2),
    ("triton", "gqa", 1, 8192, 1), ("triton", "gqa", 1, 32768, 1), ("triton", "gqa", 8, 8192, 1),
    ("triton", "absorb", 1, 8192, 1),
]
VARIANTS = {"base": (False, False), "pdl": (True, False), "pdl+trig": (True, True)}


def set_variant(name):
    td.COMBINE_PDL, tld.PDL_TRIGGER = VARIANTS[name]


def main():
    args, dev, shp, flush, copy_tbps = setup(16)
    for kernel, path, B, L, S in CELLS:
        variants = [v for v in VARIANTS if kernel == "tilelang" or v != "pdl+trig"]
        need, n_layers, xs = cell_inputs(path, shp, B, L, S, dev, args.layers)
        # correctness: alternate two input sets; every variant bitwise equal to base
        ref, errs, note = eager_check(kernel, path, shp, xs, dev, variants, set_variant)
        # graphs: single call and per layer
        graphs, keep = {}, []
        for v in list(variants):
            set_variant(v)
            calls = [make_call(kernel, path, shp, x)[0] for x in xs[:n_layers]]
            keep.append(calls)   # the closures own the output buffers the graphs write
            try:
                graphs.update(capture_layers(v, calls, dev))
            except Exception as e:   # report, time the others
                print(f"  {v}: graph capture failed: {str(e)[:200]}")
                variants.remove(v)
        set_variant("base")
        res = time_interleaved(graphs, dev, flush, rounds=args.rounds, iters=args.iters)
        copy_us = need / (copy_tbps * 1e12) * 1e6
        line = [f"{kernel:8s} {path:6s} B={B:3d} L={L:6d} s_q={S} splits={note['num_splits']:3d} layers={n_layers:2d}"]
        for mode in sorted({k[1] for k in res}):
            b = res[("base", mode)]
            parts = [f"base {b:7.1f}us ({100 * copy_us / b:3.0f}%)"]
            for v in variants[1:]:
                parts.append(f"{v} {res[(v, mode)]:7.1f}us x{b / res[(v, mode)]:.3f}")
            line.append(f"  [{'1 call' if mode == 1 else 'per layer'}] " + "  ".join(parts))
        line.append("  max |diff| vs base: " + ", ".join(f"{v} {e:.1e}" for v, e in errs.items()))
        print("\n".join(line), flush=True)
        del xs, graphs, keep
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
