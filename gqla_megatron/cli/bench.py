"""gqla-bench: roofline predictions for GQLA's two decode paths (MQA-absorb vs GQA).

Usage:
    python -m gqla_megatron.cli.bench roofline [options]

Subcommand ``roofline`` predicts, per device and s_q, one decode step of one layer for both
paths (KV-cache bytes, QK^T+PV FLOPs, intensity, memory / compute / step time, tokens/s) and
prints which path ``gqla_megatron.roofline.choose_decode_path`` picks. All numbers are
analytical (vendor peaks, 100 % efficiency, every MTP draft accepted); see
gqla_megatron/roofline.py for what is and is not counted.

Examples:
    # the paper's Table 2, recomputed cell by cell
    python -m gqla_megatron.cli.bench roofline --paper-table2
    # ... with the RoPE key stored in every group's K head (physical layout of stock kernels)
    python -m gqla_megatron.cli.bench roofline --paper-table2 --rope-layout per-group
    # canonical DeepSeek-V3 shapes, g=8, on H100/H20/H200 (defaults), s_q 1 and 2
    python -m gqla_megatron.cli.bench roofline --preset canonical-g8 --s-q 1 --s-q 2
    # LLaMA-3-8B TransGQLA on H20 with TP 2, batch 64, 32K context
    python -m gqla_megatron.cli.bench roofline --preset llama3-8b --device H20 --tp 2 \\
        --batch 64 --context 32768
    # explicit dims (all six needed without --preset; with --preset they override it)
    python -m gqla_megatron.cli.bench roofline --heads 64 --groups 4 --kv-lora-rank 512 \\
        --qk-head-dim 128 --rope-dim 64 --v-head-dim 128 --device "NVIDIA H200"
    # this machine (table entry for its GPU name, else a short measured probe)
    python -m gqla_megatron.cli.bench roofline --device local
    # plot predicted tokens/s vs context (or --png-x s_q) for both paths per device
    python -m gqla_megatron.cli.bench roofline --s-q 1 --s-q 2 --png roofline.png

Device names: H100, H100-PCIe, H800, H200, H20, A100, A100-PCIe-80GB, A100-40GB, L40S, B200,
torch.cuda.get_device_name() strings such as "NVIDIA H100 80GB HBM3", or "local".
--png needs matplotlib (pip install matplotlib).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from gqla_megatron.config import GQLAConfig
from gqla_megatron import roofline as rl

DEFAULT_DEVICES = ("H100", "H20", "H200")

_DIM_FLAGS = (  # (argparse dest, GQLAConfig field, flag)
    ("heads", "num_attention_heads", "--heads"),
    ("groups", "num_query_groups", "--groups"),
    ("kv_lora_rank", "kv_lora_rank", "--kv-lora-rank"),
    ("qk_head_dim", "qk_head_dim", "--qk-head-dim"),
    ("rope_dim", "qk_pos_emb_head_dim", "--rope-dim"),
    ("v_head_dim", "v_head_dim", "--v-head-dim"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gqla_megatron.cli.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("roofline", help="roofline predictions and decode-path choice",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--device", action="append", default=None, metavar="NAME",
                   help=f"device (repeatable; default {' '.join(DEFAULT_DEVICES)})")
    r.add_argument("--preset", choices=sorted(rl.PRESETS), default=None,
                   help="model shapes (default canonical-g8 when no explicit dims are given)")
    for dest, fname, flag in _DIM_FLAGS:
        r.add_argument(flag, dest=dest, type=int, default=None, help=f"GQLAConfig.{fname}")
    r.add_argument("--hidden-size", type=int, default=None,
                   help="d_model (not used by the roofline; default: preset's, else h_q*d_v)")
    r.add_argument("--s-q", dest="s_q", type=int, action="append", default=None,
                   help="query tokens per step, 1 + MTP drafts (repeatable; default 1)")
    r.add_argument("--context", type=int, default=rl.PAPER_TABLE2_CONTEXT,
                   help=f"cached tokens per sequence (default {rl.PAPER_TABLE2_CONTEXT})")
    r.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    r.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    r.add_argument("--path", choices=rl.REQUESTS, default="auto",
                   help="decode path to request (default auto)")
    r.add_argument("--rope-layout", choices=rl.ROPE_LAYOUTS, default="once",
                   help="GQA cache layout: RoPE key once per token (paper) or per group")
    r.add_argument("--dtype-bytes", type=float, default=2.0,
                   help="bytes per cached value (default 2, BF16)")
    r.add_argument("--paper-table2", action="store_true",
                   help="print the paper's Table 2 recomputed cell by cell and exit")
    r.add_argument("--png", default=None, metavar="PATH",
                   help="also write a plot of predicted tokens/s for both paths per device")
    r.add_argument("--png-x", choices=("context", "s_q"), default="context",
                   help="x axis of the --png plot (default context)")
    r.set_defaults(handler=_cmd_roofline, subparser=r)
    from gqla_megatron.bench_decode import add_parser as add_decode_parser
    from gqla_megatron.bench_decode import add_targets_parser
    add_decode_parser(sub)
    add_targets_parser(sub)
    return p


def _config_from_args(args, parser) -> GQLAConfig:
    given = {fname: getattr(args, dest) for dest, fname, _ in _DIM_FLAGS
             if getattr(args, dest) is not None}
    if args.preset is None and given:
        missing = [flag for dest, _, flag in _DIM_FLAGS if getattr(args, dest) is None]
        if missing:
            parser.error(f"without --preset all dims are needed; missing: {' '.join(missing)}")
        base = {"hidden_size": args.hidden_size or given["num_attention_heads"] * given["v_head_dim"]}
    else:
        base = rl.PRESETS[args.preset or "canonical-g8"].to_dict()
        if args.hidden_size is not None:
            base["hidden_size"] = args.hidden_size
    base.update(given)
    try:
        return GQLAConfig.from_dict(base)
    except ValueError as e:
        parser.error(f"invalid model dims: {e}")


def _resolve_devices(names: Sequence[str], parser) -> List[rl.DeviceSpec]:
    out = []
    for name in names:
        if name.lower() == "local":
            out.append(rl.device_spec_for())
            continue
        spec = rl.lookup_device(name)
        if spec is None:
            parser.error(f"unknown device {name!r}; known devices: {', '.join(rl.DEVICES)} "
                         f"(or a torch.cuda.get_device_name() string, or 'local' to measure "
                         f"this machine)")
        out.append(spec)
    return out


_fmt_k = rl.format_rate


def print_paper_table2(rope_layout: str = "once", file=None) -> None:
    """Print the recomputed Table 2 (gqla-method.md 4.3)."""
    file = file or sys.stdout
    cfg = rl.PRESETS["canonical-g8"]
    print(f"GQLA paper Table 2, recomputed: L={rl.PAPER_TABLE2_CONTEXT}, BF16, batch 1, tp 1, "
          f"h_q={cfg.num_attention_heads} r={cfg.kv_lora_rank} d_n={cfg.qk_head_dim} "
          f"d_r={cfg.qk_pos_emb_head_dim} d_v={cfg.v_head_dim}, GQA RoPE key stored "
          f"{rope_layout}", file=file)
    hdr = ("GPU", "path", "g", "s_q", "cache B/tok", "I", "mem us", "cmp us", "step us", "tok/s")
    fmt = "{:<6} {:<10} {:>2} {:>3} {:>11} {:>6} {:>7} {:>7} {:>8} {:>8}"
    print(fmt.format(*hdr), file=file)
    for row in rl.paper_table2(rope_layout):
        print(fmt.format(row.gpu, "MQA-absorb" if row.path == "absorb" else "GQA", row.g, row.s_q,
                         f"{row.cache_bytes_per_token:g}", f"{row.intensity:.1f}",
                         f"{row.mem_us:.2f}", f"{row.cmp_us:.2f}", f"{row.step_us:.2f}",
                         _fmt_k(row.tokens_per_s)), file=file)


def _decide_all(cfg, devices, s_qs, args):
    """Decisions per (device, s_q); raises ValueError before anything is printed."""
    return {(dev.name, s_q): rl.choose_decode_path(
                cfg, dev, s_q=s_q, batch=args.batch, context=args.context, tp=args.tp,
                requested=args.path, dtype_bytes=args.dtype_bytes, rope_layout=args.rope_layout)
            for dev in devices for s_q in s_qs}


def _print_predictions(cfg, devices, s_qs, args, decisions, file=None) -> None:
    file = file or sys.stdout
    print(f"model: h_q={cfg.num_attention_heads} g={cfg.num_query_groups} r={cfg.kv_lora_rank} "
          f"d_n={cfg.qk_head_dim} d_r={cfg.qk_pos_emb_head_dim} d_v={cfg.v_head_dim} | "
          f"L={args.context} batch={args.batch} tp={args.tp} dtype_bytes={args.dtype_bytes:g} "
          f"rope_layout={args.rope_layout} | per rank, one layer, one decode step", file=file)
    fmt = "{:<10} {:>3} {:<7} {:>9} {:>7} {:>9} {:>9} {:>9} {:>10} {:<8} {}"
    print(fmt.format("device", "s_q", "path", "B/tok", "I", "mem us", "cmp us", "step us",
                     "tok/s", "bound", ""), file=file)
    for dev in devices:
        print(f"# {dev.name}: {dev.bf16_tflops:g} TFLOP/s, {dev.hbm_tbps:g} TB/s, ridge "
              f"{dev.ridge:.1f} FLOP/B ({dev.source})", file=file)
        for s_q in s_qs:
            d = decisions[(dev.name, s_q)]
            for p in rl.PATHS:
                e = d.estimates[p]
                mark = "<- chosen" if p == d.path else ""
                if e is None:
                    print(fmt.format(dev.name, s_q, p, "-", "-", "-", "-", "-", "-",
                                     "unsupported", mark), file=file)
                else:
                    print(fmt.format(dev.name, s_q, p, f"{e.cache_bytes_per_token:g}",
                                     f"{e.intensity:.1f}", f"{e.mem_us:.3f}", f"{e.compute_us:.3f}",
                                     f"{e.step_us:.3f}", _fmt_k(e.tokens_per_s), e.bound, mark),
                          file=file)
            c = d.chosen
            line = (f"  choice on {dev.name}, s_q={s_q}: {d.path} (predicted step "
                    f"{c.step_us:.3f} us, {_fmt_k(c.tokens_per_s)} tok/s")
            other = d.estimates[rl.PATHS[1 - rl.PATHS.index(d.path)]]
            if other is not None:
                line += (f"; other path {other.path}: step {other.step_us:.3f} us, "
                         f"{_fmt_k(other.tokens_per_s)} tok/s")
            print(line + ")", file=file)
            for p, rs in d.reasons.items():
                for r in rs:
                    print(f"    {p}: {r}", file=file)
            for n in d.notes:
                print(f"    note: {n}", file=file)


def plot_png(path, cfg, devices, s_qs, args) -> None:
    """Write a PNG of predicted tokens/s vs context (or vs s_q) for both paths per device.
    Raises ImportError with an install hint if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--png needs matplotlib, which is not installed "
                          "(pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(devices)
    fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 4.0), squeeze=False)
    kw = dict(batch=args.batch, tp=args.tp, dtype_bytes=args.dtype_bytes)
    for ax, dev in zip(axes[0], devices):
        for p in rl.PATHS:
            if rl.path_problems(cfg, p, args.tp):
                continue
            ls = "-" if p == "absorb" else "--"
            if args.png_x == "context":
                xs = sorted({2 ** k for k in range(10, 18)} | {args.context})
                for s_q in s_qs:
                    ys = [rl.estimate(cfg, dev, p, s_q=s_q, context=x, rope_layout=args.rope_layout,
                                      **kw).tokens_per_s for x in xs]
                    ax.plot(xs, ys, ls, marker="o", ms=3, label=f"{p}, s_q={s_q}")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("context L (tokens)")
            else:
                xs = list(range(1, max(8, max(s_qs)) + 1))
                ys = [rl.estimate(cfg, dev, p, s_q=x, context=args.context,
                                  rope_layout=args.rope_layout, **kw).tokens_per_s for x in xs]
                ax.plot(xs, ys, ls, marker="o", ms=3, label=p)
                ax.set_xlabel(f"s_q (query tokens per step), L={args.context}")
        ax.set_yscale("log")
        ax.set_ylabel("predicted tokens/s (one layer)")
        ax.set_title(f"{dev.name}: ridge {dev.ridge:.0f} FLOP/B")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"GQLA decode roofline: h_q={cfg.num_attention_heads} g={cfg.num_query_groups} "
                 f"r={cfg.kv_lora_rank} batch={args.batch} tp={args.tp}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cmd_roofline(args, parser) -> int:
    for fname in ("context", "batch", "tp"):
        if getattr(args, fname) <= 0:
            parser.error(f"--{fname} must be a positive integer, got {getattr(args, fname)}")
    s_qs = args.s_q or [1]
    if any(s <= 0 for s in s_qs):
        parser.error(f"--s-q must be positive integers, got {s_qs}")
    if not args.dtype_bytes > 0:
        parser.error(f"--dtype-bytes must be > 0, got {args.dtype_bytes}")
    if args.paper_table2:
        print_paper_table2(args.rope_layout)
        return 0
    cfg = _config_from_args(args, parser)
    devices = _resolve_devices(args.device or DEFAULT_DEVICES, parser)
    try:
        decisions = _decide_all(cfg, devices, s_qs, args)
    except ValueError as e:
        parser.error(str(e))
    _print_predictions(cfg, devices, s_qs, args, decisions)
    if args.png:
        try:
            plot_png(args.png, cfg, devices, s_qs, args)
        except ImportError as e:
            parser.error(str(e))
        print(f"wrote {args.png}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, args.subparser)


if __name__ == "__main__":
    sys.exit(main())
