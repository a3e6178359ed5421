"""Shared by the in-process experiments: build a cell's call with the package's bench method,
capture it in a CUDA graph and time several graphs interleaved (combine_discard, pdl_combine,
splits_per_layer; ``absorb_ab`` with ``float64_checks``, ``time_variants`` and ``report_cell``:
the A/B of partials_bf16, swap_operands and seesaw); load a variant of the TileLang kernel module from source text and compare
absorb-kernel modules against float64 and each other (epilogue_ab, epilogue_split_ab, timeline).

Import with the experiments folder on sys.path (the scripts add it)."""

import importlib.util
import os
import statistics
import tempfile

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


def capture_layers(v, calls, dev):
    """Graphs of variant ``v`` over one decode step's layers: {(v, 1): ``calls[0]`` alone, and with
    more than one call (v, len(calls)): all of them back to back} (``capture``'s pairs)."""
    graphs = {(v, 1): capture(calls[0], dev)}
    if len(calls) > 1:
        graphs[(v, len(calls))] = capture(lambda: [c() for c in calls], dev)
    return graphs


def graph_errors(graphs, ref, dev):
    """Replay each graph of ``capture_layers`` once more (after timing): {key: max |difference|
    of its layer-0 output from ``ref``}."""
    err = {}
    for (v, n), (g, out) in graphs.items():   # the replays still compute layer 0's result
        g.replay()
        torch.cuda.synchronize(dev)
        err[(v, n)] = ((out if n == 1 else out[0]).float() - ref.float()).abs().max().item()
    return err


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


def time_variants(variants, xs, n_layers, ref, dev, flush, *, rounds, iters, make, activate=None):
    """The A/B loop of one cell (partials_bf16, swap_operands, seesaw). Per variant v:
    ``activate(v)`` (e.g. set a module flag the call reads), its eager call on xs[0] compared with
    ``ref``, then ``make(v, x)``'s calls on the first ``n_layers`` inputs captured as CUDA graphs --
    one call (layer 0) and, with more than one layer, all of them back to back -- and
    ``activate(None)`` after the last. The graphs are timed interleaved (``time_interleaved``) and
    each replayed once more, its layer-0 output compared with ``ref``. Returns (times
    {(v, layers): us}, eager {v: max |diff|}, graphs {(v, layers): max |diff|})."""
    activate = activate or (lambda v: None)
    eager, graphs, keep = {}, {}, []
    for v in variants:
        activate(v)
        eager[v] = (make(v, xs[0])().float() - ref.float()).abs().max().item()
        calls = [make(v, x) for x in xs[:n_layers]]
        keep.append(calls)   # the closures own the output buffers the graphs write
        graphs.update(capture_layers(v, calls, dev))
    activate(None)
    res = time_interleaved(graphs, dev, flush, rounds=rounds, iters=iters)
    return res, eager, graph_errors(graphs, ref, dev)


def float64_checks(cases, variants, dev, run):
    """Absorb A/B accuracy: per case (shapes name, B, L, s_q, splits or None = the TileLang
    planner's) and query scale (1: diffuse attention; 8: peaked), ragged lengths, each variant's
    output (``run(v, x, splits, out)`` fills ``out``, NaN before the call) against float64
    attention; one printed line per case and scale (max |reference|, max and mean |error|)."""
    from gqla_megatron.kernels import tilelang_decode as tld

    for name, B, L, S, ns in cases:
        shp = bd.Shapes(**bd.SHAPES[name])
        for q_scale in (1.0, 8.0):
            x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0, seed=1)
            x["q"] = (x["q"].float() * q_scale).to(x["q"].dtype)
            x["lengths"] = torch.randint(L // 2, L - S + 1, (B,), device=dev, dtype=x["lengths"].dtype)
            ref = absorb_reference(x, S, shp.heads)
            n = ns or tld.plan_splits(B, S * shp.heads, L, dev)
            line = (f"check {name:9s} B={B} L={L} s_q={S} splits={n:3d} q x{q_scale:.0f}: "
                    f"max |ref| {ref.abs().max().item():.2e}")
            for v in variants:
                o = torch.full_like(x["q"], float("nan"))
                run(v, x, n, o)
                err = (o.double() - ref).abs()
                line += f"  {v}: max err {err.max().item():.2e} mean {err.mean().item():.2e}"
            print(line, flush=True)
            del x, ref


def report_cell(head, res, eager, graph_err, copy_us, flop=None):
    """Print one cell of ``time_variants``: per mode (one call / per layer) each variant's time, %
    of the copy rate (and TFLOP/s given ``flop``), the last variant's speed over the first; then
    the max differences."""
    names = list(eager)
    a, z = names[0], names[-1]
    lines = [head]
    for mode in sorted({k[1] for k in res}):
        parts = []
        for v in names:
            t = res[(v, mode)]
            parts.append(f"{v} {t:7.1f}us ({100 * copy_us / t:3.0f}% copy"
                         + (f", {flop / t / 1e6:4.0f} TFLOP/s" if flop else "") + ")")
        lines.append(f"  [{'1 call' if mode == 1 else 'per layer'}] " + "  ".join(parts)
                     + f" x{res[(a, mode)] / res[(z, mode)]:.3f}")
    lines.append(f"  max |diff| vs {a} eager: eager " + ", ".join(f"{v} {e:.1e}" for v, e in eager.items())
                 + "; graphs " + ", ".join(f"{v}/{n} {e:.1e}" for (v, n), e in graph_err.items()))
    print("\n".join(lines), flush=True)


def absorb_ab(variants, checks, cells, *, flop=False):
    """Absorb-kernel A/B in one process (partials_bf16, swap_operands, seesaw). ``variants``:
    {name: (module with the package's ``absorb_decode`` / ``plan_splits``, {module attribute:
    value} set while the variant is built, captured and checked -- a flag the module reads per
    call -- and reset after)}; the first is the reference. First ``float64_checks`` over
    ``checks``; then per cell of ``cells`` (shapes name, B, L, s_q) ``time_variants`` -- CUDA-graph
    replays interleaved over --rounds rounds (median of the rounds' medians), L2 flushed (write)
    before each replay, one call and per layer of --layers layers (own inputs each, one graph),
    each graph replayed once more and compared with the first variant's eager output -- printed
    by ``report_cell`` (with TFLOP/s when ``flop``). Command line as ``setup``."""
    args, dev, _, flush, copy_tbps = setup(32)
    names = list(variants)
    saved = {(id(mod), k): (mod, k, getattr(mod, k)) for mod, flags in variants.values() for k in flags}

    def activate(v):
        for mod, k, val in saved.values():
            setattr(mod, k, val)
        if v is not None:
            mod, flags = variants[v]
            for k, val in flags.items():
                setattr(mod, k, val)

    def call(v, x):
        mod = variants[v][0]
        out = torch.empty_like(x["q"])
        return lambda: mod.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"],
                                         out=out, max_len=x["L"], validate=False)

    def run(v, x, n, o):
        activate(v)
        variants[v][0].absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"], out=o,
                                     num_splits=n)
        activate(None)

    float64_checks(checks, names, dev, run)
    for name, B, L, S in cells:
        shp = bd.Shapes(**bd.SHAPES[name])
        need, n_layers, xs = cell_inputs("absorb", shp, B, L, S, dev, args.layers)
        activate(names[0])
        ref = call(names[0], xs[0])().clone()
        activate(None)
        res, eager, graph_err = time_variants(names, xs, n_layers, ref, dev, flush, rounds=args.rounds,
                                              iters=args.iters, make=call, activate=activate)
        mod = variants[names[-1]][0]
        report_cell(f"{name:9s} B={B:3d} L={L:6d} s_q={S} splits={mod.plan_splits(B, S * shp.heads, L, dev):3d} "
                    f"layers={n_layers:2d}", res, eager, graph_err, need / (copy_tbps * 1e12) * 1e6,
                    bd.flops("absorb", shp, B, L, S) if flop else None)
        del xs, ref
        torch.cuda.empty_cache()


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


def load_kernel_module(src: str, name: str):
    """Import TileLang kernel module source ``src`` (the package's tilelang_decode.py, patched or
    from an older commit) as module ``name`` from a temporary file -- TileLang parses kernel
    source from the defining file, so the text must live in one; the package file is untouched."""
    src = src.replace("from . import triton_decode as td", "from gqla_megatron.kernels import triton_decode as td")
    path = os.path.join(tempfile.mkdtemp(prefix=name + "_"), name + ".py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def absorb_reference(x, S, H):
    """float64 absorb attention (the maths of gqla_megatron.reference) on bench inputs ``x``."""
    q, qr, c, kr = (x[k].double() for k in ("q", "q_rope", "c", "k_rope"))
    T = c.shape[1]
    s = (torch.einsum("bshr,btr->bsht", q, c) + torch.einsum("bshd,btd->bsht", qr, kr)) * x["scale"]
    last = x["lengths"].long()[:, None] + torch.arange(S, device=q.device)[None, :]
    vis = torch.arange(T, device=q.device)[None, None, :] <= last[:, :, None]
    s = s.masked_fill(~vis[:, :, None, :], float("-inf"))
    return torch.einsum("bsht,btr->bshr", torch.softmax(s, -1), c)


def compare_absorb_modules(variants, checks, cells, dev):
    """A/B of absorb-kernel modules (``variants``: [(name, module)], the first the baseline; each
    with the package's ``absorb_decode`` / ``plan_splits``). First ``checks`` (B, L, s_q, splits):
    ragged lengths, outputs NaN-filled, max |error| of each against float64 printed. Then
    ``cells`` (B, L, s_q): each timed as the grid does (graph replay, write flush), three times
    alternating, the middle value kept; the last variant's speed over the first printed."""
    from gqla_megatron import bench_decode as bd

    rates = bd.measure_rates(dev, copy_mib=1024, gemm_n=8192)
    print(f"copy {rates['copy_tbps']:.2f} TB/s", flush=True)
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    flush = bd.L2Flush(dev, "write")
    width = max(len(n) for n, _ in variants)
    for B, L, S, ns in checks:
        x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0, seed=1)
        x["lengths"] = torch.randint(0, L - S + 1, (B,), device=dev, dtype=x["lengths"].dtype)
        ref = absorb_reference(x, S, shp.heads)
        for name, mod in variants:
            o = torch.full_like(x["q"], float("nan"))
            mod.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"], out=o,
                              num_splits=ns)
            print(f"check {name:{width}s} B={B} L={L} s_q={S} splits={ns}: max abs err vs float64 "
                  f"{(o.double() - ref).abs().max().item():.2e}", flush=True)
        del x
    (a, _), (z, last) = variants[0], variants[-1]
    for B, L, S in cells:
        x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0)
        out = torch.empty_like(x["q"])
        nbytes = bd.cache_bytes("absorb", shp, B, L, 2) + bd.qo_bytes("absorb", shp, B, S, 2)
        ideal = nbytes / (rates["copy_tbps"] * 1e12) * 1e6
        fns = {name: (lambda mod=mod: mod.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"],
                                                       x["scale"], out=out, max_len=x["L"], validate=False))
               for name, mod in variants}
        times = {k: [] for k in fns}
        for _ in range(3):
            for name in fns:
                times[name].append(bd.time_graph(fns[name], dev, warmup=3, iters=30, flush=flush) * 1e6)
        t = {k: sorted(v)[1] for k, v in times.items()}
        print(f"B={B:3d} L={L:5d} s_q={S} splits={last.plan_splits(B, S * shp.heads, L, dev):3d}: "
              + "  ".join(f"{n} {t[n]:7.1f} us ({ideal / t[n]:4.0%} of copy)" for n in fns)
              + f"  {z}/{a} speed {t[a] / t[z]:.3f}x  ["
              + " | ".join(" ".join(f"{v:.1f}" for v in times[n]) for n in fns) + "]", flush=True)
        del x, out
