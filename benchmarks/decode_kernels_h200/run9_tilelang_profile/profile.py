"""Where the TileLang absorb kernel's time goes at small and large grids (torch.profiler
kernel times), and a small tile/stage sweep. Run on the H200 (see cmd.sh)."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from gqla_megatron import bench_decode as bd
from gqla_megatron.kernels import tilelang_decode as tld
from gqla_megatron.kernels import triton_decode as td

dev = torch.device("cuda")
shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=dev)


def kernels(fn, n=5):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and "fill" not in e.key.lower() and "zero" not in e.key.lower():
            out[e.key[:60]] = (e.count, e.device_time_total / max(1, e.count))
    return out


for (B, L, S) in [(1, 1024, 1), (1, 32768, 2), (8, 8192, 2), (128, 8192, 1), (128, 8192, 2)]:
    x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0)
    o = torch.empty_like(x["q"])
    f_tl = lambda: tld.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"], out=o, max_len=L, validate=False)
    f_tr = lambda: td.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"], out=o, max_len=L, validate=False)
    for name, f in (("tilelang", f_tl), ("triton", f_tr)):
        ks = kernels(f)
        print(f"B={B} L={L} s_q={S} {name}: " + "; ".join(f"{k} x{c}: {t:.1f}us" for k, (c, t) in ks.items()), flush=True)
    # sweep: tiles / stages / split counts (graph replay, L2 flushed)
    res = []
    for bn, ns in ((64, 2), (32, 3), (32, 4)):
        for sp in (None, 1, 2, 4, 8, 16, 32, 66, 132):
            try:
                f = lambda: tld.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"], out=o,
                                              max_len=L, validate=False, block_n=bn, num_stages=ns, num_splits=sp)
                t = bd.time_graph(f, dev, warmup=3, iters=10, flush=flush)
                res.append((t * 1e6, bn, ns, sp))
            except Exception as e:
                print("  fail", bn, ns, sp, type(e).__name__, str(e)[:200], flush=True)
    res.sort()
    nb = bd.cache_bytes("absorb", shp, B, L, 2)
    print(f"  best: " + ", ".join(f"{t:.1f}us ({nb / t / 1e6:.2f}TB/s) bn={bn} st={ns} sp={sp}" for t, bn, ns, sp in res[:4]), flush=True)
    dflt = [r for r in res if r[1] == 64 and r[3] is None]
    print(f"  default: {dflt[0][0]:.1f}us" if dflt else "  default: -", flush=True)
    del x
