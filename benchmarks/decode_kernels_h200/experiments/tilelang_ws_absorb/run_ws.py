"""EXPERIMENT runner (GPU, not run yet): the hand-scheduled kernel of ws_kernel.py against the
float64 reference (NaN-poisoned slots, ragged lengths, s_q 1-2, h_q 32 and 128), then timed beside
the package's TileLang kernel (forced to the same split count, so both pay the combine) and the
Triton kernel. Command: cmd.sh in this folder (carry [".tlkit"])."""

import itertools
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path[:0] = [HERE, os.path.join(REPO, "tests", "gpu")]

import tilelang  # noqa: E402

from gqla_megatron import bench_decode as bd  # noqa: E402
from gqla_megatron.kernels import tilelang_decode as tld  # noqa: E402
from gqla_megatron.kernels import triton_decode as td  # noqa: E402
from gqla_megatron.testing import BF16_COSINE, assert_close_report  # noqa: E402
from test_triton_kernels import absorb_case  # noqa: E402
import ss_kernel  # noqa: E402
import ws_kernel  # noqa: E402

dev = torch.device("cuda")
KERNELS = {}
FAILED = []


# the experiment's kernels: same launch contract (split outputs + the Triton combine)
# a: score products issued back to back (one wait); d: the scores warpgroup's P.V not waited for
# until the next tile's scores; ef: TMA evict_first hint on the latent tiles
BUILDERS = {"ws": ws_kernel.build, "ss": ss_kernel.build,
            "ss_ef": lambda **kw: ss_kernel.build(evict="evict_first", **kw),
            "ws_a": lambda **kw: ws_kernel.build(async_qk=True, **kw),
            "ws_ad": lambda **kw: ws_kernel.build(async_qk=True, defer_pv=True, **kw),
            "ws_ade": lambda **kw: ws_kernel.build(async_qk=True, defer_pv=True, evict="evict_first", **kw),
            "ss_a": lambda **kw: ss_kernel.build(async_qk=True, **kw)}
ONLY = [k for k in os.environ.get("WS_KERNELS", ",".join(BUILDERS)).split(",") if k]


def compiled(name, len_dtype):
    if (name, len_dtype) not in KERNELS:
        KERNELS[name, len_dtype] = tilelang.compile(BUILDERS[name](len_dtype=tld._tl_dtype(len_dtype)))
    return KERNELS[name, len_dtype]


def ws_decode(name, q, qr, c, kr, lengths, scale, nsplit, out):
    B, S, H, R = q.shape
    rows = S * H
    opart = torch.empty(B, rows, nsplit, R, dtype=torch.float32, device=dev)
    lse = torch.empty(B, rows, nsplit, dtype=torch.float32, device=dev)
    compiled(name, lengths.dtype)(q.reshape(B, rows, R), qr.reshape(B, rows, -1), c, kr, lengths, opart, lse,
                             float(scale) * math.log2(math.e), H, c.shape[1])
    td._run_combine(opart, lse, out, H, R, nsplit, dev)
    return out


# ---- correctness --------------------------------------------------------------------------
for H, S in ((32, 1), (32, 2), (128, 1)):
    q, qr, c, kr, lengths, scale, table, want = absorb_case(H, S, "contiguous", torch.bfloat16, 900 + H + S,
                                                            torch.int32)
    for name, nsplit in itertools.product(ONLY, (1, 3, 7)):
        out = torch.full(want.shape, float("nan"), dtype=torch.bfloat16, device=dev)
        ws_decode(name, q, qr, c, kr, lengths, scale, nsplit, out)
        torch.cuda.synchronize()
        try:
            assert bool(torch.isfinite(out).all()), f"{name} H={H} s_q={S} splits={nsplit}: non-finite output"
            assert_close_report(f"{name} H={H} s_q={S} splits={nsplit}", out, want, rel_l2=1e-2, cos=BF16_COSINE)
        except AssertionError as e:  # keep going: the timing below is still worth the device call
            FAILED.append(str(e).splitlines()[0])
print("correctness: " + ("ok" if not FAILED else "FAILED\n  " + "\n  ".join(FAILED)), flush=True)

# ---- timing (CUDA-graph replays, L2 flushed) -----------------------------------------------
flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=dev)
rates = bd.measure_rates(dev, copy_mib=2048, gemm_n=8192)
print(f"copy {rates['copy_tbps']:.2f} TB/s, matmul {rates['gemm_tflops']:.0f} TFLOP/s", flush=True)
for shapes, cells in (("llama3-8b", [(32, 8192, 1), (32, 32768, 1), (128, 8192, 1), (128, 32768, 1),
                                     (32, 8192, 2), (32, 32768, 2), (128, 8192, 2), (128, 32768, 2)]),
                      ("h128", [(32, 32768, 1), (128, 4096, 1), (128, 32768, 1)])):
    shp = bd.Shapes(**bd.SHAPES[shapes])
    for B, L, S in cells:
        x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0)
        o = torch.empty_like(x["q"])
        ns = tld.plan_splits(B, S * shp.heads, L, dev)
        args = (x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"])
        fns = {name: (lambda name=name: ws_decode(name, *args, max(ns, 2), o)) for name in ONLY}
        fns.update({
               "tilelang_same_splits": lambda: tld.absorb_decode(*args, out=o, num_splits=max(ns, 2), validate=False),
               "tilelang_default": lambda: tld.absorb_decode(*args, out=o, max_len=L, validate=False),
               "triton": lambda: td.absorb_decode(*args, out=o, max_len=L, validate=False)})
        nbytes = bd.cache_bytes("absorb", shp, B, L, 2) + bd.qo_bytes("absorb", shp, B, S, 2)
        fl = bd.flops("absorb", shp, B, L, S)
        msg = []
        for name, f in fns.items():
            t = bd.time_graph(f, dev, warmup=3, iters=10, flush=flush)
            msg.append(f"{name} {t * 1e6:.1f}us {100 * nbytes / t / 1e12 / rates['copy_tbps']:.0f}%copy "
                       f"{100 * fl / t / 1e12 / rates['gemm_tflops']:.0f}%mm")
        print(f"{shapes} B={B} L={L} s_q={S} splits={max(ns, 2)}: " + " | ".join(msg), flush=True)
        del x
