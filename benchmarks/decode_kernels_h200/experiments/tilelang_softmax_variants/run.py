"""EXPERIMENT (session 6): cheaper work per tile in the TileLang absorb kernel's "scores" warpgroup.

Why: the load-pipeline probe (../tilelang_pipeline_probe, run 2) streams the kernel's ring at
89-107 % of the copy rate with no math, so the ring is not what holds the kernel at 60-83 %: the
consumers are. At 128 heads the kernel computes at ~57 % of the matmul rate, i.e. ~2.6 us per
64 x 64-token tile; the same tile's bytes take ~2.3 us at the copy rate. Every microsecond the
"scores" warpgroup spends between the score product and the P.V product is on that path.

Variants (``build_absorb_program(opts=...)``; "" is the package kernel of session 5):
  ""   (run 1) mask evaluated on every element (row // heads per element), scale multiplied in
  "m"  per-row key limits computed once, no mask at all on tiles every row sees whole, the
       softmax scale folded into exp2 (one FMA per element)
  "mr" "m" + P kept in registers for the scores warpgroup's own P.V (wgmma with A in registers)
  "mo" "mr" + that P.V issued asynchronously, the next tile's score products issued behind it,
       one wait for both (the buffer is released as soon as the P.V is done)
Run 1 (``run1/``): "m" 1.05-1.14x in every memory-bound cell, "mr"/"mo" no better than "m";
"m" became the package kernel (and "" from then on), the "r"/"o" code was removed (commit
history has it). Run 2 (``cmd.sh``): "" against "n" (exp2 without a per-element select for rows
with no visible key yet); for split cells also the split kernel alone (no combine).

Each variant is checked against float64 (ragged lengths, NaN-poisoned slots, h_q 32 / 128,
s_q 1 / 2, 1 / planned / 7 splits), then timed at equal split counts in the same process
(CUDA-graph replays, L2 flushed), interleaved per cell.

The switches lived in ``build_absorb_program(opts=...)`` only while measured: run 1 ran at commit
2c327b8 (m, r, o), run 2 at f962b23 (n); after run 2 the winners became the kernel and the switch
was removed (commit after 2b6f482), so this script runs only at those commits:
``git checkout 2c327b8 -- gqla_megatron/kernels/tilelang_decode.py`` (or f962b23) first.

Run (one H200, carry [".tlkit"]): cmd.sh in this folder (run 1: ``run.py "" m mr mo``; run 2:
``run.py "" n``, as in ../../run13_fast_mask/cmd.sh).
"""

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))

VARIANTS = sys.argv[1:] or [""]
CELLS = [  # (heads, B, L, s_q)
    (32, 1, 32768, 1), (32, 8, 32768, 1), (32, 32, 8192, 1), (32, 32, 32768, 1), (32, 128, 8192, 1),
    (32, 128, 32768, 1), (32, 32, 32768, 2), (32, 128, 8192, 2), (128, 32, 32768, 1), (128, 128, 8192, 1)]


def _compile(args):
    opts, direct, len_dtype = args
    from gqla_megatron.kernels import tilelang_decode as tld
    t = time.time()
    tld.compile_absorb(r=512, dr=64, dtype="bfloat16", len_dtype=len_dtype, page=0, direct=direct, opts=opts)
    return opts, direct, len_dtype, time.time() - t


def use(tld, opts, orig):
    tld.compile_absorb = lambda **kw: orig(opts=opts, **kw)


def main():
    from gqla_megatron import bench_decode as bd
    from gqla_megatron.kernels import tilelang_decode as tld
    from gqla_megatron.testing import BF16_COSINE, assert_close_report
    from test_triton_kernels import absorb_case

    out = {"variants": VARIANTS, "check": {}, "cells": []}
    jobs = [(o, d, ld) for o in VARIANTS for d in (False, True) for ld in ("int32", "int64")]
    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=min(16, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
        for o, d, ld, dt in ex.map(_compile, jobs):
            print(f"compiled opts={o!r} direct={d} {ld}: {dt:.0f} s", flush=True)
    print(f"all compiles {time.time() - t0:.0f} s (cached ones ~0)", flush=True)
    orig = tld.compile_absorb
    dev = torch.device("cuda")

    for v in VARIANTS:
        use(tld, v, orig)
        bad = []
        for H in (32, 128):
            for S in (1, 2):
                q, qr, c, kr, lengths, scale, table, want = absorb_case(H, S, "contiguous", torch.bfloat16,
                                                                        77 + H + S, torch.int64)
                for splits in (None, 1, 7):
                    o = torch.full(want.shape, float("nan"), dtype=torch.bfloat16, device=dev)
                    got = tld.absorb_decode(q, qr, c, kr, lengths, scale, out=o, num_splits=splits)
                    torch.cuda.synchronize()
                    try:
                        assert bool(torch.isfinite(got).all()), "non-finite"
                        assert_close_report(f"{v!r} H{H} S{S} splits {splits}", got, want, rel_l2=1e-2,
                                            cos=BF16_COSINE)
                    except AssertionError as e:
                        bad.append(str(e).splitlines()[0][:200])
        out["check"][v] = bad or "ok"
        print(f"check opts={v!r}: {'ok' if not bad else bad}", flush=True)

    rates = bd.measure_rates(dev, copy_mib=1024, gemm_n=8192)
    out["rates"] = rates
    print(f"copy {rates['copy_tbps']:.2f} TB/s, matmul {rates['gemm_tflops']:.0f} TFLOP/s", flush=True)
    flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=dev)
    for H, B, L, S in CELLS:
        shp = bd.Shapes(**dict(bd.SHAPES["llama3-8b"], heads=H))
        x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0)
        nsplit = tld.plan_splits(B, S * H, L, dev)
        o = torch.empty_like(x["q"])
        nbytes = bd.cache_bytes("absorb", shp, B, L, 2) + bd.qo_bytes("absorb", shp, B, S, 2)
        fl = bd.flops("absorb", shp, B, L, S)
        row = {"heads": H, "B": B, "L": L, "s_q": S, "splits": nsplit, "us": {}}
        ref_out = None
        for v in VARIANTS:
            use(tld, v, orig)
            fn = lambda: tld.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"],  # noqa: E731
                                           out=o, num_splits=nsplit, validate=False)
            sec = bd.time_graph(fn, dev, warmup=3, iters=30, flush=flush)
            row["us"][v] = sec * 1e6
            if ref_out is None:
                ref_out = o.clone()
            else:  # same inputs: the variants agree with the package kernel
                row.setdefault("max_abs_vs_pkg", {})[v] = float((o.float() - ref_out.float()).abs().max())
        if nsplit > 1:  # the split kernel alone (package variant), to see the combine's share
            use(tld, VARIANTS[0], orig)
            R, DR = shp.kv_lora_rank, shp.rope_dim
            q2, qr2 = x["q"].reshape(B, S * H, R), x["q_rope"].reshape(B, S * H, DR)
            opart = torch.empty(B, S * H, nsplit, R, dtype=torch.float32, device=dev)
            lse = torch.empty(B, S * H, nsplit, dtype=torch.float32, device=dev)
            kern = tld.compile_absorb(direct=False, **tld.kernel_args(R, DR, torch.bfloat16, torch.int32, 0))
            bt = tld._dummy_table(dev, B)
            qk = float(x["scale"]) * 1.4426950408889634
            part = lambda: kern(q2, qr2, x["c"], x["k_rope"], x["lengths"], bt, opart, lse, qk, H, L)  # noqa: E731
            row["split_kernel_only_us"] = bd.time_graph(part, dev, warmup=3, iters=30, flush=flush) * 1e6
        best = min(row["us"], key=row["us"].get)
        out["cells"].append(row)
        parts = " | ".join(f"{v or 'pkg'} {t:7.1f}us {nbytes / t / 1e6 / rates['copy_tbps']:4.0%} "
                           f"{fl / t / 1e6 / rates['gemm_tflops']:4.0%}mm" for v, t in row["us"].items())
        print(f"h{H} B={B} L={L} s_q={S} splits={nsplit}: {parts} | best {best or 'pkg'} "
              f"{row['us'][VARIANTS[0]] / row['us'][best]:.3f}x"
              + (f"; split kernel alone {row['split_kernel_only_us']:.1f}us" if nsplit > 1 else ""), flush=True)
        del x
    with open(os.path.join(os.environ.get("OUT", "."), "variants.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
