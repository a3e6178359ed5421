"""Shared by the in-process A/B experiments (combine_discard, pdl_combine): build a cell's call
with the package's bench method, capture it in a CUDA graph, and time several graphs interleaved.

Import with the experiments folder on sys.path (the scripts add it)."""

import statistics

import torch

from gqla_megatron import bench_decode as bd


def make_call(kernel, path, shp, x):
    """(call, note) of the bench method ``kernel`` ("tilelang" or "triton") on inputs ``x``."""
    fn, _, note = (bd._method_tilelang if kernel == "tilelang" else bd._method_triton)(path, shp, x)
    return fn, note


def capture(fn, dev):
    """(graph, what the captured call returned -- the output buffers the replays write). The
    caller keeps ``fn`` (its closure owns those buffers) alive as long as the graph."""
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


def time_interleaved(graphs, dev, flush, *, rounds, iters):
    """{key: median over ``rounds`` of the median replay time (us) / key[1]} for graphs keyed
    (variant, layers); every round times each graph ``iters`` times, ``flush()`` before each."""
    med = {k: [] for k in graphs}
    for _ in range(rounds):
        for k, (g, _) in graphs.items():
            ev = []
            for _ in range(iters):
                flush()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                g.replay()
                e.record()
                ev.append((s, e))
            torch.cuda.synchronize(dev)
            med[k].append(statistics.median(s.elapsed_time(e) * 1e3 for s, e in ev) / k[1])
    return {k: statistics.median(v) for k, v in med.items()}


def setup(default_layers):
    """Parse --rounds/--iters/--layers, print the machine line; (args, dev, shapes, flush, copy TB/s)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--layers", type=int, default=default_layers)
    args = ap.parse_args()
    dev = torch.device("cuda")
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    flush = bd.L2Flush(dev, "write")
    copy_tbps = bd.measure_rates(dev, copy_mib=2048, gemm_n=1024)["copy_tbps"]
    print(f"{torch.cuda.get_device_name(dev)}; copy {copy_tbps:.2f} TB/s (read+write); rounds "
          f"{args.rounds} x {args.iters} replays; layers {args.layers}; % = of the copy rate")
    return args, dev, shp, flush, copy_tbps


def cell_inputs(path, shp, B, L, S, dev, layers):
    """(bytes one layer reads and writes at least, layers to time, inputs of max(2, layers) layers)."""
    need = bd.cache_bytes(path, shp, B, L, 2) + bd.qo_bytes(path, shp, B, S, 2)
    n_layers = bd.layers_for(need, layers, torch.cuda.mem_get_info(dev)[0])
    xs = [bd.make_inputs(path, shp, B, L, S, torch.bfloat16, dev, 0, seed=i) for i in range(max(2, n_layers))]
    return need, n_layers, xs


def eager_check(kernel, path, shp, xs, dev, variants, set_variant):
    """Each variant (the first is the reference) on xs[0] and xs[1] in turn, three times: (the
    reference's outputs per input, {variant: max |difference| from the reference}, call note)."""
    ref, errs, note = {}, {}, None
    for i_v, v in enumerate(variants):
        set_variant(v)
        fns = [make_call(kernel, path, shp, x) for x in xs[:2]]
        note = fns[0][1]
        for _ in range(3):
            for i, (fn, _) in enumerate(fns):
                o = fn().clone()
                torch.cuda.synchronize(dev)
                if i_v == 0:
                    ref.setdefault(i, o)
                else:
                    errs[v] = max(errs.get(v, 0.0), (o.float() - ref[i].float()).abs().max().item())
    return ref, errs, note
