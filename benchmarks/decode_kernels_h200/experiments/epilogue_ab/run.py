"""EXPERIMENT (session 7): the absorb kernel's output stores, before and after, in one process.

The timeline experiment (../timeline, run 1) showed each program spending 6.4-11 us between its
last P.V product and its last output store: every thread stored 128 scattered 8-byte pieces
straight from the wgmma accumulator layout, each after an IEEE division by l. The package
kernel now multiplies by 1 / l (once per row) into shared memory over the latent ring (free
after the KV loop) and copies each warpgroup's half out with 16-byte vector stores.

This times the package kernel against the previous one (commit 8ad831b's
``gqla_megatron/kernels/tilelang_decode.py``, written to ``old_kernel.py`` here by cmd.sh's
local step: ``git show 8ad831b:gqla_megatron/kernels/tilelang_decode.py``), alternating the two
per cell, CUDA-graph replays with the write flush as the grid, and checks both against float64
on the same inputs.

Run 1 (``run1.log``; ``tests.log``: the GPU tests of the TileLang kernel, 31 passed, first): both
kernels give the same max error against float64 in all four checks (ragged, split and direct,
s_q 1 and 2); new / old speed 1.04-1.08x in the 32-tile cells (B=32 x 8k 72 -> 77 % of copy,
B=8 x 32k 71 -> 76 %, s_q 2 73 -> 75 %, B=128 x 2k 76 -> 83 %), 1.12x at B=128 x 1k, 1.21x at
B=1 x 32k, 0.99-1.03x in the cells of 129+ tiles per program (within the run's noise).

Run (one H200, carry [".tlkit"]): cmd.sh
"""

import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)

from gqla_megatron import bench_decode as bd  # noqa: E402
from gqla_megatron.kernels import tilelang_decode as new  # noqa: E402


def load_old():
    src = open(os.path.join(HERE, "old_kernel.py")).read()
    src = src.replace("from . import triton_decode as td", "from gqla_megatron.kernels import triton_decode as td")
    path = os.path.join(HERE, "_old_kernel_abs.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("tld_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference(x, S, H):
    """float64 absorb attention (the same maths as gqla_megatron.reference, on the bench inputs)."""
    q = x["q"].double()
    qr = x["q_rope"].double()
    c = x["c"].double()
    kr = x["k_rope"].double()
    B, T = c.shape[0], c.shape[1]
    s = (torch.einsum("bshr,btr->bsht", q, c) + torch.einsum("bshd,btd->bsht", qr, kr)) * x["scale"]
    last = x["lengths"].long()[:, None] + torch.arange(S, device=q.device)[None, :]
    vis = torch.arange(T, device=q.device)[None, None, :] <= last[:, :, None]
    s = s.masked_fill(~vis[:, :, None, :], float("-inf"))
    return torch.einsum("bsht,btr->bshr", torch.softmax(s, -1), c)


def main():
    dev = torch.device("cuda")
    old = load_old()
    rates = bd.measure_rates(dev, copy_mib=1024, gemm_n=8192)
    print(f"copy {rates['copy_tbps']:.2f} TB/s", flush=True)
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    flush = bd.L2Flush(dev, "write")
    # correctness first, small ragged cells (split and direct, s_q 1 and 2)
    for B, L, S, ns in ((3, 1000, 1, 3), (3, 1000, 2, 1), (2, 4100, 1, 5), (5, 700, 2, 2)):
        x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0, seed=1)
        x["lengths"] = torch.randint(0, L - S + 1, (B,), device=dev, dtype=x["lengths"].dtype)
        ref = reference(x, S, shp.heads)
        for name, mod in (("old", old), ("new", new)):
            o = torch.full_like(x["q"], float("nan"))
            mod.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"], out=o,
                              num_splits=ns)
            err = (o.double() - ref).abs().max().item()
            print(f"check {name} B={B} L={L} s_q={S} splits={ns}: max abs err vs float64 {err:.2e}", flush=True)
        del x
    for B, L, S in ((128, 2048, 1), (32, 8192, 1), (8, 32768, 1), (32, 8192, 2), (128, 8192, 1), (128, 8192, 2),
                    (32, 32768, 1), (128, 1024, 1), (1, 32768, 1), (128, 32768, 2)):
        x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0)
        out = torch.empty_like(x["q"])
        nbytes = bd.cache_bytes("absorb", shp, B, L, 2) + bd.qo_bytes("absorb", shp, B, S, 2)
        ideal = nbytes / (rates["copy_tbps"] * 1e12) * 1e6
        fns = {name: (lambda mod=mod: mod.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"],
                                                       x["scale"], out=out, max_len=x["L"], validate=False))
               for name, mod in (("old", old), ("new", new))}
        times = {"old": [], "new": []}
        for _ in range(3):
            for name in ("old", "new"):
                times[name].append(bd.time_graph(fns[name], dev, warmup=3, iters=30, flush=flush) * 1e6)
        t = {k: sorted(v)[1] for k, v in times.items()}
        print(f"B={B:3d} L={L:5d} s_q={S} splits={new.plan_splits(B, S * shp.heads, L, dev):2d}: old {t['old']:7.1f} us "
              f"({ideal / t['old']:4.0%} of copy)  new {t['new']:7.1f} us ({ideal / t['new']:4.0%})  "
              f"new/old speed {t['old'] / t['new']:.3f}x   [3 alternating timings each: "
              f"{' '.join(f'{v:.1f}' for v in times['old'])} | {' '.join(f'{v:.1f}' for v in times['new'])}]",
              flush=True)
        del x, out


if __name__ == "__main__":
    main()
