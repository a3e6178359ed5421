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

import argparse
import statistics
import sys

import torch

sys.path.insert(0, ".")
from gqla_megatron import bench_decode as bd  # noqa: E402
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


def make_call(kernel, path, shp, x):
    fn, _, note = (bd._method_tilelang if kernel == "tilelang" else bd._method_triton)(path, shp, x)
    return fn, note


def capture(fn, dev):
    """(graph, what the captured call returned -- the output buffers the replays write)."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize(dev)
    return g, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda")
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    flush = bd.L2Flush(dev, "write")
    copy_tbps = bd.measure_rates(dev, copy_mib=2048, gemm_n=1024)["copy_tbps"]
    print(f"{torch.cuda.get_device_name(dev)}; copy {copy_tbps:.2f} TB/s (read+write); rounds "
          f"{args.rounds} x {args.iters} replays; layers {args.layers}; % = of the copy rate")
    for kernel, path, B, L, S in CELLS:
        need = bd.cache_bytes(path, shp, B, L, 2) + bd.qo_bytes(path, shp, B, S, 2)
        n_layers = bd.layers_for(need, args.layers, torch.cuda.mem_get_info(dev)[0])
        xs = [bd.make_inputs(path, shp, B, L, S, torch.bfloat16, dev, 0, seed=i) for i in range(max(2, n_layers))]
        ref, errs, note = {}, {}, None
        for v, flag in VARIANTS.items():
            td.COMBINE_DISCARD = flag
            fns = [make_call(kernel, path, shp, x) for x in xs[:2]]
            note = fns[0][1]
            for _ in range(3):
                for i, (fn, _) in enumerate(fns):
                    o = fn().clone()
                    torch.cuda.synchronize(dev)
                    if v == "keep":
                        ref.setdefault(i, o)
                    else:
                        errs[v] = max(errs.get(v, 0.0), (o.float() - ref[i].float()).abs().max().item())
        graphs, keep = {}, []
        for v, flag in VARIANTS.items():
            td.COMBINE_DISCARD = flag
            calls = [make_call(kernel, path, shp, x)[0] for x in xs[:n_layers]]
            keep.append(calls)   # the closures own the output buffers the graphs write
            graphs[(v, 1)] = capture(calls[0], dev)
            if n_layers > 1:
                graphs[(v, n_layers)] = capture(lambda calls=calls: [c() for c in calls], dev)
        td.COMBINE_DISCARD = False
        med = {k: [] for k in graphs}
        for _ in range(args.rounds):
            for k, (g, _) in graphs.items():
                ev = []
                for _ in range(args.iters):
                    flush()
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    g.replay()
                    e.record()
                    ev.append((s, e))
                torch.cuda.synchronize(dev)
                med[k].append(statistics.median(s.elapsed_time(e) * 1e3 for s, e in ev) / k[1])
        graph_err = {}
        for (v, n), (g, out) in graphs.items():   # the replays still compute layer 0's result
            g.replay()
            torch.cuda.synchronize(dev)
            first = out if n == 1 else out[0]
            graph_err[(v, n)] = (first.float() - ref[0].float()).abs().max().item()
        res = {k: statistics.median(v) for k, v in med.items()}
        copy_us = need / (copy_tbps * 1e12) * 1e6
        line = [f"{kernel:8s} {path:6s} B={B:3d} L={L:6d} s_q={S} splits={note['num_splits']:3d} layers={n_layers:2d}"]
        for mode in sorted({k[1] for k in res}):
            b, d = res[("keep", mode)], res[("discard", mode)]
            line.append(f"  [{'1 call' if mode == 1 else 'per layer'}] keep {b:7.1f}us ({100 * copy_us / b:3.0f}%)"
                        f"  discard {d:7.1f}us ({100 * copy_us / d:3.0f}%) x{b / d:.3f}")
        line.append(f"  max |diff| vs keep: eager {errs['discard']:.1e}; graphs "
                    + ", ".join(f"{v}/{n} {e:.1e}" for (v, n), e in graph_err.items()))
        print("\n".join(line), flush=True)
        g = out = first = None
        del xs, graphs, keep
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
