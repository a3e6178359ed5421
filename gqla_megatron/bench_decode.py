"""gqla-bench decode: decode-attention kernels of both GQLA paths against stock peers, one step
of one layer, on a grid of batch B x context L x s_q x path.

    gqla-bench decode --out bench_out                       # full grid, LLaMA-3-8B GQLA shapes
    gqla-bench decode --batch 1,32 --context 8k --s-q 1 --path absorb --out /tmp/b
    gqla-bench decode --shapes h128 --path absorb --out /tmp/b128      # 128-head absorb
    gqla-bench decode --sweep --out /tmp/sweep              # tile/warp/stage/split sweep
    gqla-bench decode --no-cuda-graphs --out /tmp/eager      # eager launches instead of graph replays
    gqla-bench targets bench_out other_run/decode_bench.json  # issue #6's targets over saved runs
    python -m gqla_megatron.bench_decode ...                # same without the entry point

Per cell: L cached keys per sequence (all sequences the same length; the s_q new tokens are the
last s_q of them, causal among themselves), inputs random in --dtype.

Methods (each timed alone, inputs prepared outside the timed region):
  triton       gqla_megatron.kernels.triton_decode (absorb: latent kernel on W_UK-folded
               queries; gqa: per-group kernel), split heuristic and default tiles unless
               GQLA_DECODE_* variables say otherwise (see that module)
  bmm          the stock torch backends' math: absorb = batched matmul over the latent
               (TorchAbsorb's scores / softmax / PV, without the tiny W_UK / W_UV GEMMs, which
               no method here includes); gqa = TorchGQA's einsums
  sdpa_cudnn / sdpa_efficient / sdpa_flash
               torch SDPA restricted to one backend with torch.nn.attention.sdpa_kernel.
               absorb: one head of width 576 (K = [c ; k_rope], V = c) with all heads x s_q
               folded into query rows; gqa: enable_gqa=True with K = [k_nope ; k_rope] per group
               (the stock layout: RoPE key stored in every group), else the heads of a group
               folded into query rows. The first formulation a backend accepts is timed.
  flex         torch.compile(flex_attention), same formulations (block mask for s_q > 1);
               compile time is capped by --flex-budget-s, later cells report n/a.
A method that cannot run reports "n/a: <reason>"; a cell (or method) whose tensors would not
fit the free GPU memory is skipped with the estimate.

Timing (--cuda-graphs, the default on CUDA): every method alike (triton and all peers) is run
--warmup times eagerly on a side stream, one call is captured in a torch.cuda.CUDAGraph, and
--iters graph replays are timed with CUDA events; the L2 flush (a 256 MiB write, unless
--no-flush) runs outside the graph before each timed replay. This is how a serving engine runs
a decode step (our engine's cuda_graphs=True), and it keeps the host's Python launch cost (tens
of us per Triton launch) out of the kernel time. A method whose capture fails is timed eagerly
and marked (row "timing": "eager" with "timing_note"; a section of the markdown).
--no-cuda-graphs times eager launches (host launch cost included, as in an eager decode loop).
--layers N times each method over N layers instead of one call: N inputs (own cache, query and
output each, so no layer reads another's cache from L2) called back to back in the one graph,
the flush before the replay, time / N reported. A decode step runs its layers' attention this
way: the graph launch is paid once per step, and between kernels there is only the gap inside a
graph (the run also measures the launch floor per layer); a cell caps N where its inputs would
pass 8 GiB (a call that long is not about fixed costs), and rows carry the N they ran with.

Reported per method: median time (CUDA events over --iters timed calls after --warmup), achieved
TB/s = bytes / time,
TFLOP/s, % of the copy bandwidth and % of the bf16 matmul rate, both measured at the start of
the same run (a --copy-mib device-to-device copy counted read + write; a --gemm-n cubed bf16
matmul). Bytes = what the method must read and write at least: the cache it reads (the GQLA
layout -- RoPE key once per token -- for triton and bmm; the stock per-group layout for the
SDPA / flex gqa formulations, which read more) plus q and o; a row-block re-read of the cache
(absorb at h_q * s_q > 64 rows) is not counted. FLOPs = 2 B s_q h_q L (d_qk + d_v) with
d_qk = r + d_r, d_v = r (absorb) or d_n + d_r, d_v (gqa); causal trimming ignored.

Outputs in --out: decode_bench.json (everything), decode_bench.md (one table per path, then issue
#6's targets: the cells that meet each and, for each miss, the ceiling -- bytes or FLOPs at the
measured rate plus the one-kernel launch floor -- that the run's timing leaves it), and
decode_bench.png (TB/s vs L per B and s_q, triton vs the best peer; needs matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

SHAPES = {
    "llama3-8b": dict(heads=32, groups=8, kv_lora_rank=512, rope_dim=64, qk_head_dim=128, v_head_dim=128),
    "h128": dict(heads=128, groups=8, kv_lora_rank=512, rope_dim=64, qk_head_dim=128, v_head_dim=128),
}
PEERS = ("bmm", "sdpa_cudnn", "sdpa_efficient", "sdpa_flash", "flex")
KERNELS = ("triton", "tilelang")   # ours; the summary compares each against the stock PEERS
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shapes:
    heads: int
    """h_q: query heads (per GPU)."""
    groups: int
    """g: KV groups (GQA path)."""
    kv_lora_rank: int
    """r: latent width (absorb path)."""
    rope_dim: int
    """d_r: shared RoPE key width."""
    qk_head_dim: int
    """d_n: per-group content key width (GQA path)."""
    v_head_dim: int
    """d_v: per-group value width (GQA path)."""


class NotApplicable(Exception):
    """A method cannot run this cell; the message is the reason."""


# ------------------------------------------------------------------------------------------
# timing and machine rates
# ------------------------------------------------------------------------------------------
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn: Callable, dev: torch.device, *, warmup: int, iters: int,
            flush: Optional[Callable] = None) -> float:
    """Median seconds of one ``fn()`` call (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    if dev.type == "cuda":
        return _cuda_median(fn, dev, iters=iters, flush=flush)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class L2Flush:
    """Runs before each timed call to take the cell's data out of L2 (50 MB on an H200).

    ``write`` zeroes a 256 MiB buffer -- the usual way (triton.testing.do_bench) -- and leaves L2
    full of dirty lines, which the timed kernel's first reads must write back to HBM: ~12 us of
    HBM traffic charged to every kernel that reads more than L2 holds (benchmarks/
    decode_kernels_h200, session 6). ``read`` reads the buffer instead: L2 is left holding other,
    clean data, as after the weight-reading GEMMs that precede attention in a decode step."""

    MODES = ("write", "read")

    def __init__(self, dev: torch.device, mode: str = "write", mib: int = 256):
        if mode not in self.MODES:
            raise ValueError(f"l2_flush: {mode!r} is not one of {self.MODES}")
        self.mode = mode
        self.buf = torch.zeros(mib * 2 ** 20 // 4, dtype=torch.int32, device=dev)
        self.sink = torch.empty((), dtype=torch.int32, device=dev)

    def __call__(self) -> None:
        if self.mode == "write":
            self.buf.zero_()
        else:
            torch.amax(self.buf, dim=0, out=self.sink)


def _cuda_median(call: Callable, dev: torch.device, *, iters: int, flush=None) -> float:
    """Median seconds of ``call()`` bracketed by CUDA events, the L2 flush (if any) before each:
    an ``L2Flush`` (or any callable), or a tensor to zero (the older scripts' way)."""
    if isinstance(flush, torch.Tensor):
        flush = flush.zero_
    events = []
    for _ in range(iters):
        if flush is not None:
            flush()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        call()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize(dev)
    return statistics.median(s.elapsed_time(e) * 1e-3 for s, e in events)


def time_graph(fn: Callable, dev: torch.device, *, warmup: int, iters: int,
               flush: Optional[Callable] = None) -> float:
    """Median seconds of one replay of a CUDA graph holding one ``fn()`` call.

    As torch's CUDA-graph docs require: ``warmup`` (at least 2) eager calls on a side stream,
    then one call captured in a ``torch.cuda.CUDAGraph``; each timed replay is bracketed by CUDA
    events, with the L2 flush (if any) launched outside the graph before it. This takes the
    host's launch cost out of the measurement, as in serving (decode steps run as graph
    replays). Raises whatever the capture raises (the caller falls back to eager timing)."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(max(2, warmup)):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize(dev)
        graph.replay()
        torch.cuda.synchronize(dev)
        return _cuda_median(graph.replay, dev, iters=iters, flush=flush)
    finally:
        del graph


def time_method(fn: Callable, dev: torch.device, *, warmup: int, iters: int,
                flush: Optional[Callable], graphs: bool) -> tuple:
    """(median seconds, timing mode, note): graph replay when ``graphs`` (CUDA only) and the
    capture works, else eager launches ("eager" and the capture error as the note)."""
    if graphs and dev.type == "cuda":
        try:
            return time_graph(fn, dev, warmup=warmup, iters=iters, flush=flush), "graph", None
        except Exception as e:  # capture refused: report eager time with the reason
            try:
                torch.cuda.synchronize(dev)
            except Exception:
                pass
            err = f"cuda graph capture failed ({_short(e, 120)}); eager time"
            return time_fn(fn, dev, warmup=warmup, iters=iters, flush=flush), "eager", err
    return time_fn(fn, dev, warmup=warmup, iters=iters, flush=flush), "eager", None


def _method_tilelang(path, shp, x):
    """The warp-specialised TileLang absorb kernel (sm_90; kernels/tilelang_decode.py)."""
    if path != "absorb":
        raise NotApplicable("the tilelang kernel covers the absorb path only")
    from gqla_megatron.kernels import tilelang_decode as tld

    problems = tld.absorb_problems(x["q"].device, x["q"].dtype, kv_lora_rank=shp.kv_lora_rank,
                                   rope_dim=shp.rope_dim)
    if problems:
        raise NotApplicable("; ".join(problems))
    paged = "block_table" in x
    c, kr = (x["c_paged"], x["k_rope_paged"]) if paged else (x["c"], x["k_rope"])
    out = torch.empty_like(x["q"])
    fn = lambda: tld.absorb_decode(x["q"], x["q_rope"], c, kr, x["lengths"], x["scale"],  # noqa: E731
                                   block_table=x.get("block_table"), out=out, max_len=x["L"], validate=False)
    nsplit = tld.plan_splits(x["B"], x["S"] * shp.heads, x["L"], x["q"].device)
    return fn, None, {"num_splits": nsplit, "paged": bool(paged)}


def measure_rates(dev: torch.device, *, copy_mib: int, gemm_n: int, iters: int = 10) -> dict:
    """Copy bandwidth (read + write counted) and bf16 matmul rate of this device, measured now."""
    numel = copy_mib * 2 ** 20 // 4
    src = torch.empty(numel, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), dev, warmup=3, iters=iters)
    del src, dst
    mm_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(gemm_n, gemm_n, device=dev, dtype=mm_dtype)
    b = torch.randn(gemm_n, gemm_n, device=dev, dtype=mm_dtype)
    out = torch.empty(gemm_n, gemm_n, device=dev, dtype=mm_dtype)
    t_mm = time_fn(lambda: torch.matmul(a, b, out=out), dev, warmup=3, iters=iters)
    del a, b, out
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"copy_tbps": 2 * numel * 4 / t_copy / 1e12, "copy_mib": copy_mib,
            "gemm_tflops": 2 * gemm_n ** 3 / t_mm / 1e12, "gemm_n": gemm_n,
            "gemm_dtype": str(mm_dtype).replace("torch.", "")}


def measure_launch_floor(dev: torch.device, flush: Optional[Callable], *, iters: int, layers: int = 1) -> dict:
    """Time of a CUDA-graph replay holding one (two) one-element kernels, timed exactly as the
    cells are (events around the replay, the L2 flush before it): the fixed cost in every cell's
    time, which no kernel can go under (a split kernel + its combine pay the two-kernel floor).
    With ``layers`` > 1 also per layer of ``layers`` such one- (two-) kernel layers in one replay,
    as ``--layers`` times the cells (``floor1_layer_us``, ``floor2_layer_us``)."""
    x = torch.zeros(1, device=dev)
    kernels = (lambda: x.add_(1), lambda: x.mul_(1))

    def per_layer_us(k: int, n: int) -> float:   # n layers of k one-element kernels in one replay
        step = lambda: [kern() for _ in range(n) for kern in kernels[:k]]  # noqa: E731
        return time_graph(step, dev, warmup=3, iters=iters, flush=flush) * 1e6 / n

    out = {"floor1_us": per_layer_us(1, 1), "floor2_us": per_layer_us(2, 1)}
    if layers > 1:
        out.update(floor1_layer_us=per_layer_us(1, layers), floor2_layer_us=per_layer_us(2, layers))
    return out


# ------------------------------------------------------------------------------------------
# cells
# ------------------------------------------------------------------------------------------
def cache_bytes(path: str, shp: Shapes, B: int, L: int, esize: int, *, rope_per_group=False) -> int:
    if path == "absorb":
        return B * L * (shp.kv_lora_rank + shp.rope_dim) * esize
    per_tok = shp.groups * (shp.qk_head_dim + shp.v_head_dim) + (
        shp.groups * shp.rope_dim if rope_per_group else shp.rope_dim)
    return B * L * per_tok * esize


def qo_bytes(path: str, shp: Shapes, B: int, S: int, esize: int) -> int:
    rows = B * S * shp.heads
    if path == "absorb":
        return rows * (2 * shp.kv_lora_rank + shp.rope_dim) * esize
    return rows * (shp.qk_head_dim + shp.rope_dim + shp.v_head_dim) * esize


def flops(path: str, shp: Shapes, B: int, L: int, S: int) -> float:
    if path == "absorb":
        d = 2 * shp.kv_lora_rank + shp.rope_dim
    else:
        d = shp.qk_head_dim + shp.rope_dim + shp.v_head_dim
    return 2.0 * B * S * shp.heads * L * d


def make_inputs(path: str, shp: Shapes, B: int, L: int, S: int, dtype, dev, page: int, seed=0) -> dict:
    g = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=dtype)

    H = shp.heads
    x = {"lengths": torch.full((B,), L - S, dtype=torch.int32, device=dev), "L": L, "S": S, "B": B}
    if path == "absorb":
        x.update(q=rnd(B, S, H, shp.kv_lora_rank), q_rope=rnd(B, S, H, shp.rope_dim),
                 c=rnd(B, L, shp.kv_lora_rank), k_rope=rnd(B, L, shp.rope_dim))
    else:
        G = shp.groups
        x.update(q=rnd(B, S, H, shp.qk_head_dim), q_rope=rnd(B, S, H, shp.rope_dim),
                 k_nope=rnd(B, L, G, shp.qk_head_dim), v=rnd(B, L, G, shp.v_head_dim),
                 k_rope=rnd(B, L, shp.rope_dim))
    x["scale"] = (shp.qk_head_dim + shp.rope_dim) ** -0.5
    if page:
        per_seq = -(-L // page)
        x["block_table"] = torch.randperm(B * per_seq, device=dev).view(B, per_seq).to(torch.int32)
        for k in (("c", "k_rope") if path == "absorb" else ("k_nope", "v", "k_rope")):
            t = x[k]
            padded = torch.zeros((B, per_seq * page) + tuple(t.shape[2:]), dtype=dtype, device=dev)
            padded[:, :L] = t
            pool = torch.empty((B * per_seq, page) + tuple(t.shape[2:]), dtype=dtype, device=dev)
            pool[x["block_table"].long().flatten()] = padded.view(B * per_seq, page, *t.shape[2:])
            x[k + "_paged"] = pool
            del padded
    return x


# ------------------------------------------------------------------------------------------
# methods: prepare(path, shp, x) -> (callable, extra_bytes_read_or_None, note)
# ------------------------------------------------------------------------------------------
def _method_triton(path, shp, x, config=None):
    from gqla_megatron.kernels import triton_decode as td

    problems = td.device_problems(x["q"].device, x["q"].dtype)
    if problems:
        raise NotApplicable("; ".join(problems))
    paged = "block_table" in x
    bt = x.get("block_table")
    L = x["L"]
    if path == "absorb":
        c, kr = (x["c_paged"], x["k_rope_paged"]) if paged else (x["c"], x["k_rope"])
        out = torch.empty_like(x["q"])
        fn = lambda: td.absorb_decode(x["q"], x["q_rope"], c, kr, x["lengths"], x["scale"],  # noqa: E731
                                      block_table=bt, out=out, config=config, max_len=L, validate=False)
        plan = td.plan_decode("absorb", batch=x["B"], s_q=x["S"], heads=shp.heads, groups=1, max_len=L,
                              dtype=x["q"].dtype, device=x["q"].device, config=config)
    else:
        kn, v, kr = ((x["k_nope_paged"], x["v_paged"], x["k_rope_paged"]) if paged
                     else (x["k_nope"], x["v"], x["k_rope"]))
        out = torch.empty(x["q"].shape[:3] + (shp.v_head_dim,), dtype=x["q"].dtype, device=x["q"].device)
        fn = lambda: td.gqa_decode(x["q"], x["q_rope"], kn, v, kr, x["lengths"], x["scale"],  # noqa: E731
                                   block_table=bt, out=out, config=config, max_len=L, validate=False)
        plan = td.plan_decode("gqa", batch=x["B"], s_q=x["S"], heads=shp.heads, groups=shp.groups,
                              max_len=L, dtype=x["q"].dtype, device=x["q"].device, config=config)
    note = {"num_splits": plan.num_splits, "config": dataclasses.asdict(plan.config),
            "paged": bool(paged)}
    return fn, None, note


def _decode_mask(S, L, dev, rows_per_s=1):
    """(S*rows_per_s, L) bool: row i (token s = i // rows_per_s) sees keys t <= L - S + s."""
    s = torch.arange(S * rows_per_s, device=dev) // rows_per_s
    return torch.arange(L, device=dev)[None, :] <= (L - S + s)[:, None]


def _method_bmm(path, shp, x):
    B, S, L, H = x["B"], x["S"], x["L"], shp.heads
    dev = x["q"].device
    mask = _decode_mask(S, L, dev)                        # (S, L)
    if path == "absorb":
        q = x["q"].reshape(B, S * H, -1)
        qr = x["q_rope"].reshape(B, S * H, -1)
        c, kr = x["c"], x["k_rope"]
        m = mask.repeat_interleave(H, 0)                  # rows s*H + h

        def fn():
            sc = (torch.bmm(q, c.transpose(1, 2)) + torch.bmm(qr, kr.transpose(1, 2))) * x["scale"]
            sc = sc.masked_fill(~m, float("-inf"))
            p = torch.softmax(sc.float(), -1).to(c.dtype)
            return torch.bmm(p, c)
        return fn, None, {"what": "TorchAbsorb latent math (bmm)"}
    G, M = shp.groups, H // shp.groups
    qn = x["q"].view(B, S, G, M, -1)
    qr = x["q_rope"].view(B, S, G, M, -1)

    def fn():
        sc = (torch.einsum("bsgmn,btgn->bgmst", qn, x["k_nope"])
              + torch.einsum("bsgmr,btr->bgmst", qr, x["k_rope"])) * x["scale"]
        sc = sc.masked_fill(~mask, float("-inf"))
        p = torch.softmax(sc.float(), -1).to(qn.dtype)
        return torch.einsum("bgmst,btgv->bsgmv", p, x["v"])
    return fn, None, {"what": "TorchGQA math (einsum)"}


def _stock_layouts(path, shp, x):
    """Formulations for SDPA / flex: list of (name, q, k, v, mask_rows_per_s, enable_gqa); built
    once per cell (kept in ``x``) and shared by the SDPA backends and flex."""
    if "_stock" not in x:
        x["_stock"] = _build_stock_layouts(path, shp, x)
    return x["_stock"]


def _build_stock_layouts(path, shp, x):
    B, S, L, H = x["B"], x["S"], x["L"], shp.heads
    if path == "absorb":
        k = torch.cat([x["c"], x["k_rope"]], -1)[:, None]            # (B, 1, L, r + d_r)
        v = x["c"][:, None]                                           # (B, 1, L, r)
        q = torch.cat([x["q"], x["q_rope"]], -1).reshape(B, 1, S * H, -1)
        return [("heads folded into rows", q, k, v, H, False)]
    G, M = shp.groups, H // shp.groups
    kr = x["k_rope"][:, :, None].expand(B, L, G, shp.rope_dim)
    k = torch.cat([x["k_nope"], kr], -1).transpose(1, 2).contiguous()  # (B, G, L, 192)
    v = x["v"].transpose(1, 2).contiguous()                            # (B, G, L, 128)
    q = torch.cat([x["q"], x["q_rope"]], -1)                           # (B, S, H, 192)
    q_gqa = q.transpose(1, 2).contiguous()                             # (B, H, S, 192)
    q_fold = q.view(B, S, G, M, -1).permute(0, 2, 1, 3, 4).reshape(B, G, S * M, -1).contiguous()
    return [("enable_gqa", q_gqa, k, v, 1, True), ("group heads folded into rows", q_fold, k, v, M, False)]


def _stock_bytes(path, shp, x, esize):
    if path == "absorb":
        return cache_bytes(path, shp, x["B"], x["L"], esize) + qo_bytes(path, shp, x["B"], x["S"], esize)
    return (cache_bytes(path, shp, x["B"], x["L"], esize, rope_per_group=True)
            + qo_bytes(path, shp, x["B"], x["S"], esize))


def _method_sdpa(backend_name):
    def prepare(path, shp, x):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "sdpa_flash": SDPBackend.FLASH_ATTENTION}[backend_name]
        S, L, dev = x["S"], x["L"], x["q"].device
        errors = []
        for name, q, k, v, rows, gqa in _stock_layouts(path, shp, x):
            mask = None if S == 1 else _decode_mask(S, L, dev, rows)[None, None]

            def fn(q=q, k=k, v=v, mask=mask, gqa=gqa):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=x["scale"],
                                                          enable_gqa=gqa)
            try:
                fn()
                _sync(dev)
            except Exception as e:  # the backend refuses this formulation
                errors.append(f"{name}: {_short(e)}")
                continue
            return fn, _stock_bytes(path, shp, x, q.element_size()), {"formulation": name}
        raise NotApplicable(" | ".join(errors))
    return prepare


_FLEX = {"compiled": None, "spent_s": 0.0, "budget_s": 120.0}


def _method_flex(path, shp, x):
    if _FLEX["spent_s"] >= _FLEX["budget_s"]:
        raise NotApplicable(f"flex compile budget ({_FLEX['budget_s']:.0f} s) used up in this run")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX["compiled"] is None:
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["compiled"]
    S, L, dev = x["S"], x["L"], x["q"].device
    errors = []
    for name, q, k, v, rows, gqa in _stock_layouts(path, shp, x):
        bm = None
        if S > 1:
            off = L - S

            def mask_mod(b, h, q_idx, kv_idx, off=off, rows=rows):
                return kv_idx <= off + q_idx // rows
            bm = create_block_mask(mask_mod, None, None, q.shape[2], L, device=dev)

        def fn(q=q, k=k, v=v, bm=bm, gqa=gqa):
            return flex(q, k, v, block_mask=bm, scale=x["scale"], enable_gqa=gqa)
        t0 = time.perf_counter()
        try:
            fn()
            _sync(dev)
        except Exception as e:
            errors.append(f"{name}: {_short(e)}")
            continue
        finally:
            _FLEX["spent_s"] += time.perf_counter() - t0
        return fn, _stock_bytes(path, shp, x, q.element_size()), {"formulation": name}
    raise NotApplicable(" | ".join(errors))


def _short(e: BaseException, n: int = 160) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}{'...' if len(msg) > n else ''}"


METHODS = {"triton": _method_triton, "tilelang": _method_tilelang, "bmm": _method_bmm, "sdpa_cudnn": _method_sdpa("sdpa_cudnn"),
           "sdpa_efficient": _method_sdpa("sdpa_efficient"), "sdpa_flash": _method_sdpa("sdpa_flash"),
           "flex": _method_flex}


def extra_memory(method: str, path: str, shp: Shapes, B: int, L: int, S: int, esize: int) -> int:
    """Rough bytes a method allocates beyond the inputs (for the fits-in-memory check)."""
    scores = B * S * shp.heads * L * 4 * 3
    if method == "triton":
        return B * S * shp.heads * 512 * 4 * 8 + (1 << 20)   # partial outputs of a few splits
    if method == "bmm":
        return scores + (0 if path == "absorb" else 2 * cache_bytes(path, shp, B, L, esize))
    stock = cache_bytes(path, shp, B, L, esize, rope_per_group=True)
    return stock + (scores if method == "sdpa_efficient" and S > 1 else 0)


# ------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------
def _parse_list(text: str, kind=int) -> List:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        mult = 1
        if kind is int and item.endswith("k"):
            item, mult = item[:-1], 1024
        try:
            out.append(kind(item) * mult if kind is int else kind(item))
        except ValueError:
            raise ValueError(f"cannot parse {item!r} in {text!r}") from None
    return out


LAYERS_MAX_BYTES = 8 << 30
"""--layers stops adding layers to a cell past this many input bytes: a call that reads this much
runs for milliseconds, where the per-call fixed costs --layers is about are noise."""


def layers_for(need: int, layers: int, free: Optional[int]) -> int:
    """Layers a cell is timed over under ``--layers``: at most ``layers``, with all their inputs
    (``need`` bytes each) within LAYERS_MAX_BYTES and 40 % of the free memory (``free``; None on
    CPU), and at least 1."""
    cap = LAYERS_MAX_BYTES if free is None else min(LAYERS_MAX_BYTES, 0.4 * free)
    return max(1, min(layers, int(cap // max(need, 1))))


def run_cell(path, shp, B, L, S, dtype, dev, args, rates, flush, methods) -> List[dict]:
    esize = torch.finfo(dtype).bits // 8
    base = {"path": path, "B": B, "L": L, "s_q": S, "dtype": str(dtype).replace("torch.", "")}
    rows = []
    need = cache_bytes(path, shp, B, L, esize) * (2 if args.page_size else 1) + qo_bytes(path, shp, B, S, esize)
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
    if free is not None and need > 0.85 * free:
        for m in methods:
            rows.append({**base, "method": m, "status": "skipped",
                         "reason": f"inputs need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"})
        return rows
    n_layers = layers_for(need, args.layers, free)
    x = make_inputs(path, shp, B, L, S, dtype, dev, args.page_size)
    # --layers: more layers' inputs (own cache, query and output each), timed back to back
    xs = [x] + [make_inputs(path, shp, B, L, S, dtype, dev, args.page_size, seed=i) for i in range(1, n_layers)]
    ideal_bytes = cache_bytes(path, shp, B, L, esize) + qo_bytes(path, shp, B, S, esize)
    fl = flops(path, shp, B, L, S)
    outs = {}
    for m in methods:
        row = {**base, "method": m}
        if dev.type == "cuda":
            free = torch.cuda.mem_get_info(dev)[0]
            extra = extra_memory(m, path, shp, B, L, S, esize) * n_layers
            if extra > 0.85 * free:
                rows.append({**row, "status": "skipped",
                             "reason": f"needs ~{extra / 2**30:.1f} GiB more, {free / 2**30:.1f} GiB free"})
                continue
        try:
            fn, nbytes, note = METHODS[m](path, shp, x)
            fns = [fn] + [METHODS[m](path, shp, xi)[0] for xi in xs[1:]]
            call = fn if n_layers == 1 else (lambda fns=fns: [f() for f in fns])
            t, mode, why = time_method(call, dev, warmup=args.warmup, iters=args.iters, flush=flush,
                                       graphs=args.cuda_graphs)
            t /= n_layers
            del fns, call
        except NotApplicable as e:
            rows.append({**row, "status": "n/a", "reason": str(e)})
            continue
        except Exception as e:  # a failure of one method must not end the run
            rows.append({**row, "status": "n/a", "reason": _short(e, 300)})
            continue
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if m in (*KERNELS, "bmm"):   # same row order: (B, s_q * h_q, d_v)
            outs[m] = fn().reshape(B, S * shp.heads, -1).float()
        nbytes = nbytes or ideal_bytes
        tbps, tflops = nbytes / t / 1e12, fl / t / 1e12
        row.update(status="ok", time_us=t * 1e6, bytes=nbytes, tbps=tbps, tflops=tflops,
                   pct_copy=100 * tbps / rates["copy_tbps"], pct_gemm=100 * tflops / rates["gemm_tflops"],
                   note=note, timing=mode, layers=n_layers)
        if why:
            row["timing_note"] = why
        rows.append(row)
    if "bmm" in outs:   # sanity: our kernels agree with the stock math on this cell
        b = outs["bmm"]
        for k in KERNELS:
            if k in outs:
                err = ((outs[k] - b).norm() / b.norm().clamp_min(1e-30)).item()
                next(r for r in rows if r["method"] == k)["rel_l2_vs_bmm"] = err
    del x, xs, outs
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def summarize(rows: List[dict]) -> List[dict]:
    """One summary per cell: triton vs the best peer and vs bmm."""
    cells: Dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r["path"], r["B"], r["L"], r["s_q"]), {})[r["method"]] = r
    out = []
    for (path, B, L, S), ms in cells.items():
        t = ms.get("triton")
        peers = {m: r for m, r in ms.items() if m not in KERNELS and r.get("status") == "ok"}
        best = min(peers.items(), key=lambda kv: kv[1]["time_us"]) if peers else None
        ok = [r for r in ms.values() if r.get("status") == "ok"]
        s = {"path": path, "B": B, "L": L, "s_q": S, "triton": t,
             "layers": ok[0].get("layers", 1) if ok else None,   # every method of a cell alike
             "best_peer": best[0] if best else None, "best_peer_us": best[1]["time_us"] if best else None}
        if t and t.get("status") == "ok":
            s["x_best_peer"] = best[1]["time_us"] / t["time_us"] if best else None
            s["x_bmm"] = peers["bmm"]["time_us"] / t["time_us"] if "bmm" in peers else None
        tl_ = ms.get("tilelang")
        if tl_ and tl_.get("status") == "ok":
            s["tilelang"] = tl_
            if t and t.get("status") == "ok":
                s["tilelang_x_triton"] = t["time_us"] / tl_["time_us"]
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------
# targets (issue #6): which cells of a run meet them, and which could not under its timing
# ------------------------------------------------------------------------------------------
TARGETS = (
    ("memory", "memory-bound cells with B x L >= 256k tokens: >= 90 % of the copy rate"),
    ("b1", "B = 1, L >= 8k: >= 60 % of the copy rate"),
    ("peer", "every cell >= 1.0x the best stock peer"),
    ("bmm", "absorb >= 2.5x the batched-matmul peer"),
    ("compute", "compute-bound absorb cells (h_q x s_q >= 128): >= 70 % of the matmul rate"),
)


def _ours(s: dict) -> Optional[Tuple[str, dict]]:
    """(kernel, row) of the fastest of our kernels that ran in a summary cell."""
    ok = [(k, s.get(k)) for k in KERNELS if s.get(k) and s[k].get("status") == "ok"]
    return min(ok, key=lambda kr: kr[1]["time_us"]) if ok else None


def ceiling(row: dict, rates: dict, of: str = "copy") -> Optional[float]:
    """The % of the copy (``of="copy"``) or matmul rate this row's cell could reach at most under
    the run's timing: the bytes (or FLOPs) at the measured rate plus the launch floor of one
    kernel (per layer where the row was timed over several layers, else per call) -- a call that
    streams at the copy rate from its first nanosecond, with no split combine and no tail. None
    where the run measured no floor (eager timing, CPU)."""
    floor = rates.get("floor1_layer_us" if row.get("layers", 1) > 1 else "floor1_us")
    if floor is None:
        return None
    busy = row["time_us"] * (row["pct_copy"] if of == "copy" else row["pct_gemm"]) / 100
    return 100 * busy / (busy + floor)


def targets(result: dict) -> List[dict]:
    """Issue #6's targets over one run (``gqla-bench decode`` result): per target and path, the
    cells it applies to, how many meet it, and each miss with our best kernel's figure and (for
    the rate targets) the ``ceiling`` the run's launch floor leaves. A cell is memory-bound when
    its bytes at the copy rate take longer than its FLOPs at the matmul rate (% copy >= % matmul)."""
    rates = result["rates"]
    heads = result["shapes"]["heads"]
    out = []
    for key, text in TARGETS:
        for path in sorted({s["path"] for s in result["summary"]}):
            cells, misses = 0, []
            for s in sorted((s for s in result["summary"] if s["path"] == path),
                            key=lambda s: (s["s_q"], s["B"], s["L"])):
                best = _ours(s)
                if best is None:
                    continue
                kernel, row = best
                cell = f"B={s['B']} L={s['L']} s_q={s['s_q']}"
                if key == "memory":
                    applies = s["B"] * s["L"] >= 256 * 1024 and row["pct_copy"] >= row["pct_gemm"]
                    value, need, unit, of = row["pct_copy"], 90.0, "% copy", "copy"
                elif key == "b1":
                    applies = s["B"] == 1 and s["L"] >= 8192
                    value, need, unit, of = row["pct_copy"], 60.0, "% copy", "copy"
                elif key == "peer":
                    applies = s.get("best_peer_us") is not None
                    value = s["best_peer_us"] / row["time_us"] if applies else None
                    need, unit, of = 1.0, "x best peer", None
                elif key == "bmm":
                    bmm = next((r for r in result["rows"] if r["path"] == path and r["B"] == s["B"]
                                and r["L"] == s["L"] and r["s_q"] == s["s_q"] and r["method"] == "bmm"
                                and r.get("status") == "ok"), None)
                    applies = path == "absorb" and bmm is not None
                    value = bmm["time_us"] / row["time_us"] if applies else None
                    need, unit, of = 2.5, "x bmm", None
                else:
                    applies = path == "absorb" and heads * s["s_q"] >= 128
                    value, need, unit, of = row["pct_gemm"], 70.0, "% matmul", "gemm"
                if not applies:
                    continue
                cells += 1
                if value < need:
                    miss = {"cell": cell, "kernel": kernel, "value": value, "unit": unit}
                    if of:
                        miss["ceiling"] = ceiling(row, rates, of)
                    misses.append(miss)
            if cells:
                out.append({"target": key, "text": text, "path": path, "cells": cells,
                            "met": cells - len(misses), "misses": misses})
    return out


def targets_markdown(result: dict, title: str = "## Targets (issue #6)") -> List[str]:
    """Markdown lines of ``targets``: one row per target and path, misses with their ceilings."""
    rows = targets(result)
    if not rows:
        return []
    r = result["rates"]
    if r.get("floor1_us") is None:
        floor = " (not measured in this run)"
    else:
        floor = f" ({r['floor1_us']:.2f} us per call" + (
            f", {r['floor1_layer_us']:.2f} us per layer in cells timed over several layers"
            if result.get("layers", 1) > 1 and r.get("floor1_layer_us") is not None else "") + ")"
    lines = [title, "",
             "Our best kernel per cell (triton or tilelang). Ceiling: the most a cell could reach under "
             "this run's timing -- its bytes (FLOPs) at the measured copy (matmul) rate plus the launch "
             "floor of one kernel" + floor
             + "; a miss whose ceiling is below the target cannot meet it as timed here.", "",
             "| target | path | met | misses: cell, kernel, value (ceiling) |", "|---|---|---:|---|"]
    for t in rows:
        miss = "; ".join(f"{m['cell']} {m['kernel']} {m['value']:.{2 if m['unit'].startswith('x') else 0}f}"
                         f"{'' if m['unit'].startswith('x') else ' %'}"
                         + (f" ({m['ceiling']:.0f} %)" if m.get("ceiling") is not None else "")
                         for m in t["misses"]) or "-"
        lines.append(f"| {t['text']} | {t['path']} | {t['met']} of {t['cells']} | {miss} |")
    return lines + [""]


def markdown(result: dict) -> str:
    r = result["rates"]
    lines = [f"# Decode attention, one layer, one step ({result['device']})", "",
             f"Shapes: {result['shapes_name']} {result['shapes']}; dtype {result['dtype']}; "
             f"page size {result['page_size'] or 'contiguous'}; copy {r['copy_tbps']:.2f} TB/s "
             f"({r['copy_mib']} MiB D2D, read+write), matmul {r['gemm_tflops']:.0f} TFLOP/s "
             f"({r['gemm_dtype']} {r['gemm_n']}^3); median of {result['iters']} after {result['warmup']} "
             f"warmup{(', L2 flushed (' + str(result.get('l2_flush')) + ')') if result['flush'] else ''}; "
             f"{'CUDA-graph replays' if result.get('cuda_graphs') else 'eager launches'}"
             + (f" (launch floor: a replay of one tiny kernel {r['floor1_us']:.1f} us, of two "
                f"{r['floor2_us']:.1f} us)" if 'floor1_us' in r else "")
             + (f"; **per layer**: each method timed over up to {result['layers']} layers (own cache, "
                f"query and output each) called back to back in one replay, time / layers (column "
                f"`layers`: fewer where the inputs would pass 8 GiB)"
                + (f", launch floor per layer {r['floor1_layer_us']:.2f} us (one kernel) / "
                   f"{r['floor2_layer_us']:.2f} us (two)" if 'floor1_layer_us' in r else "")
                if result.get('layers', 1) > 1 else "")
             + (f"; PYTORCH_CUDA_ALLOC_CONF={result['alloc_conf']!r}" if result.get("alloc_conf") is not None else "")
             + f"{'' if result.get('complete', True) else ' (INCOMPLETE: the run stopped early)'}.", ""]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    per_layer = result.get("layers", 1) > 1
    lcol, lsep = (" layers |", "---:|") if per_layer else ("", "")

    def layers_of(s):
        return f" {fmt(s.get('layers'), 'd')} |" if per_layer else ""

    for path in sorted({s["path"] for s in result["summary"]}):
        lines += [f"## {path}", "",
                  "| B | L | s_q | triton us | TB/s | % copy | TFLOP/s | % matmul | splits | best peer | peer us | x best peer | x bmm | rel err vs bmm |" + lcol,
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|" + lsep]
        for s in sorted((s for s in result["summary"] if s["path"] == path), key=lambda s: (s["s_q"], s["B"], s["L"])):
            t = s["triton"] or {}
            if t.get("status") == "ok":
                cols = [fmt(t["time_us"], ".1f"), fmt(t["tbps"], ".2f"), fmt(t["pct_copy"], ".0f"),
                        fmt(t["tflops"], ".1f"), fmt(t["pct_gemm"], ".0f"), str(t["note"]["num_splits"])]
            else:
                cols = [f"{t.get('status', '-')}: {t.get('reason', '')}"[:60], "-", "-", "-", "-", "-"]
            lines.append(f"| {s['B']} | {s['L']} | {s['s_q']} | " + " | ".join(cols) + " | "
                         f"{s['best_peer'] or '-'} | {fmt(s['best_peer_us'], '.1f')} | "
                         f"{fmt(s.get('x_best_peer'), '.2f')} | {fmt(s.get('x_bmm'), '.2f')} | "
                         f"{fmt(t.get('rel_l2_vs_bmm'), '.1e')} |" + layers_of(s))
        lines.append("")
    tls = [s for s in result["summary"] if s.get("tilelang")]
    if tls:
        lines += ["## absorb, TileLang kernel (warp-specialised, sm_90)", "",
                  "| B | L | s_q | tilelang us | TB/s | % copy | TFLOP/s | % matmul | splits | x triton | x best peer | rel err vs bmm |" + lcol,
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + lsep]
        for s in sorted(tls, key=lambda s: (s["s_q"], s["B"], s["L"])):
            t = s["tilelang"]
            lines.append(f"| {s['B']} | {s['L']} | {s['s_q']} | {t['time_us']:.1f} | {t['tbps']:.2f} | "
                         f"{t['pct_copy']:.0f} | {t['tflops']:.1f} | {t['pct_gemm']:.0f} | "
                         f"{t['note']['num_splits']} | {fmt(s.get('tilelang_x_triton'), '.2f')} | "
                         f"{fmt(s['best_peer_us'] / t['time_us'] if s['best_peer_us'] else None, '.2f')} | "
                         f"{fmt(t.get('rel_l2_vs_bmm'), '.1e')} |" + layers_of(s))
        lines.append("")
    lines += targets_markdown(result)
    eager = sorted({(r["method"], r["path"], r["timing_note"]) for r in result["rows"] if r.get("timing_note")})
    if eager:
        lines += ["## Methods timed eagerly (graph capture failed)", ""]
        lines += [f"- {m} ({p}): {n}" for m, p, n in eager] + [""]
    na = sorted({(r["method"], r["path"], r.get("reason", "")) for r in result["rows"] if r["status"] != "ok"})
    if na:
        lines += ["## Methods that did not run", ""]
        seen = set()
        for m, p, reason in na:
            if (m, p, reason) not in seen:
                seen.add((m, p, reason))
                lines.append(f"- {m} ({p}): {reason}")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path_png: str) -> Optional[str]:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib not installed (pip install matplotlib); no PNG"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = sorted({s["path"] for s in result["summary"]})
    sqs = sorted({s["s_q"] for s in result["summary"]})
    fig, axes = plt.subplots(len(paths), len(sqs), figsize=(5.5 * len(sqs), 4.0 * len(paths)), squeeze=False)
    for i, p in enumerate(paths):
        for j, S in enumerate(sqs):
            ax = axes[i][j]
            cells = [s for s in result["summary"] if s["path"] == p and s["s_q"] == S]
            for k, B in enumerate(sorted({s["B"] for s in cells})):
                row = sorted((s for s in cells if s["B"] == B), key=lambda s: s["L"])
                col = f"C{k}"
                xs = [s["L"] for s in row if s["triton"] and s["triton"].get("status") == "ok"]
                ys = [s["triton"]["tbps"] for s in row if s["triton"] and s["triton"].get("status") == "ok"]
                if xs:
                    ax.plot(xs, ys, "-o", color=col, ms=3, label=f"triton B={B}")
                tl_pts = [(s["L"], s["tilelang"]["tbps"]) for s in row if s.get("tilelang")]
                if tl_pts:
                    ax.plot(*zip(*tl_pts), "-.s", color=col, ms=3, label=f"tilelang B={B}")
                pr = [(s["L"], s) for s in row if s["best_peer"]]
                if pr:
                    ys = []
                    for L, s in pr:
                        peer = next(r for r in result["rows"] if r["path"] == p and r["B"] == B and r["L"] == L
                                    and r["s_q"] == S and r["method"] == s["best_peer"])
                        ys.append(peer["tbps"])
                    ax.plot([L for L, _ in pr], ys, "--x", color=col, ms=3, label=f"best peer B={B}")
            ax.axhline(result["rates"]["copy_tbps"], color="k", lw=0.8, ls=":", label="copy BW")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context L")
            ax.set_ylabel("achieved TB/s")
            ax.set_title(f"{p}, s_q={S}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(f"GQLA decode attention ({result['device']}, {result['shapes_name']}, {result['dtype']})", fontsize=10)
    fig.tight_layout()
    tmp = path_png + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path_png)
    return None


def _write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.basename(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------
SWEEP_CELLS = {"absorb": [(1, 8192, 1), (8, 32768, 1), (32, 8192, 1), (128, 8192, 1), (32, 8192, 2),
                          (128, 8192, 2)],
               "gqa": [(1, 4096, 1), (1, 8192, 1), (8, 8192, 1), (8, 32768, 1), (32, 4096, 1)]}


def sweep_configs(path: str) -> List[dict]:
    """Candidates around the H200 sweeps' winners (defaults first). Kept small: every tile
    shape is one Triton compile (seconds), and the whole sweep must stay near two minutes."""
    out = [{}]
    if path == "absorb":
        # 32-row tiles: 4-warp tiles under 114 KB shared memory and 255 registers run two
        # programs per SM (waves 2): 32 x 32 x 3 stages 113 KB, 32 x 64 x 2 stages 115 KB
        for bn, nw, ns, wv in ((32, 4, 2, 2.0), (64, 4, 2, 2.0), (32, 4, 3, 2.0), (64, 8, 3, 1.0),
                               (64, 8, 2, 1.0), (32, 8, 3, 1.0)):
            out.append(dict(block_n=bn, num_warps=nw, num_stages=ns, waves=wv))
        for wv, mc in ((2.0, 128), (1.0, 64), (1.0, 256)):
            out.append(dict(waves=wv, min_chunk=mc))
        # > 32 rows (s_q 2, 128 heads): 32-row blocks at two programs per SM (each block reads the KV)
        out.append(dict(block_m=32, block_n=32, num_warps=4, num_stages=3, waves=2.0))
    else:
        for bn, nw, ns in ((64, 8, 3), (128, 4, 2), (64, 4, 4), (32, 4, 3), (64, 4, 2)):
            out.append(dict(block_n=bn, num_warps=nw, num_stages=ns))
        for mc, wv in ((64, 2.0), (64, 3.0), (128, 1.0), (32, 1.0)):
            out.append(dict(min_chunk=mc, waves=wv))
    return out


def parse_cells(text: str) -> List[Tuple[int, int, int]]:
    """'B:L:S,...' (L may use k = 1024) -> [(B, L, S), ...]."""
    cells = []
    for item in _parse_list(text, str):
        parts = item.split(":")
        if len(parts) != 3:
            raise ValueError(f"--sweep-cells entry {item!r} is not B:L:S")
        b, l, q = parts
        cells.append((int(b), _parse_list(l)[0], int(q)))
    return cells


def run_sweep(args, shp, dtype, dev, rates, flush) -> dict:
    from gqla_megatron.kernels import triton_decode as td

    results = {}
    paths = _parse_list(args.path, str)
    for path in paths:
        for B, L, S in (parse_cells(args.sweep_cells) if args.sweep_cells else SWEEP_CELLS[path]):
            x = make_inputs(path, shp, B, L, S, dtype, dev, args.page_size)
            esize = torch.finfo(dtype).bits // 8
            nbytes = cache_bytes(path, shp, B, L, esize) + qo_bytes(path, shp, B, S, esize)
            tried = []
            for extra in sweep_configs(path):
                cfg = td.DecodeKernelConfig(**extra)
                try:
                    fn, _, note = _method_triton(path, shp, x, config=cfg)
                    t, _, _ = time_method(fn, dev, warmup=2, iters=max(5, args.iters // 2), flush=flush,
                                          graphs=args.cuda_graphs)
                except Exception as e:
                    tried.append({"config": extra, "status": "n/a", "reason": _short(e)})
                    continue
                tried.append({"config": extra, "status": "ok", "time_us": t * 1e6,
                              "tbps": nbytes / t / 1e12, "num_splits": note["num_splits"]})
            ok = sorted((r for r in tried if r["status"] == "ok"), key=lambda r: r["time_us"])
            key = f"{path} B={B} L={L} s_q={S}"
            results[key] = tried
            _write_atomic(os.path.join(args.out, "decode_sweep.json"),   # kept if the run is cut short
                          json.dumps({"rates": rates, "shapes": dataclasses.asdict(shp), "sweep": results}, indent=1))
            print(f"\n== sweep {key} (copy {rates['copy_tbps']:.2f} TB/s)")
            for r in ok[:8]:
                print(f"  {r['time_us']:9.1f} us {r['tbps']:5.2f} TB/s "
                      f"({100 * r['tbps'] / rates['copy_tbps']:3.0f} %) splits {r['num_splits']:3d} "
                      f"{r['config'] or 'defaults'}")
            if ok and ok[0]["config"]:
                env = " ".join(f"GQLA_DECODE_{path.upper()}_{k.upper()}={v}" for k, v in ok[0]["config"].items())
                print(f"  best: {env}")
            nfail = sum(r["status"] != "ok" for r in tried)
            if nfail:
                print(f"  {nfail} configs failed, e.g. {next(r for r in tried if r['status'] != 'ok')}")
            del x
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", default="1,8,32,128", help="comma list of batch sizes B (default 1,8,32,128)")
    p.add_argument("--context", default="1k,4k,8k,32k", help="comma list of contexts L; k = 1024 (default 1k,4k,8k,32k)")
    p.add_argument("--s-q", dest="s_q", default="1,2", help="comma list of query tokens per step (default 1,2)")
    p.add_argument("--path", default="absorb,gqa", help="comma list of paths (default absorb,gqa)")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="llama3-8b",
                   help="model shapes: llama3-8b (h_q=32, g=8, r=512, d_r=64, d_n=d_v=128) or h128 (h_q=128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype (default bf16)")
    p.add_argument("--page-size", type=int, default=0, help="paged cache for the triton kernels (0 = contiguous)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list of peers (default {','.join(PEERS)}; '' for none)")
    p.add_argument("--no-triton", action="store_true", help="peers only")
    p.add_argument("--kernels", default="triton",
                   help="comma list of our kernels to time: triton, tilelang (absorb path, sm_90, "
                        "needs the tilelang package) (default triton)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per method (default 3)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per method (default 10)")
    p.add_argument("--cuda-graphs", dest="cuda_graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="time every method as a CUDA-graph replay (default on CUDA; --no-cuda-graphs: "
                        "eager launches, host launch cost included)")
    p.add_argument("--no-flush", dest="flush", action="store_false", help="do not flush L2 between timed calls")
    p.add_argument("--l2-flush", choices=L2Flush.MODES, default="write",
                   help="how L2 is flushed before each timed call: write (zero a 256 MiB buffer, "
                        "the usual way; leaves dirty lines the kernel pays to write back) or read "
                        "(read it; clean lines, as in a decode step) (default write)")
    p.add_argument("--layers", type=int, default=1,
                   help="time each method over this many layers, each with its own cache, query "
                        "and output, called back to back (one graph), and report the time per "
                        "layer, as a decode step runs its attention layers; fewer in a cell whose "
                        "inputs would pass 8 GiB or 40 %% of free memory (rows' `layers`) "
                        "(default 1: one call)")
    p.add_argument("--allocator", choices=("expandable", "default"), default="expandable",
                   help="PyTorch's CUDA caching allocator for the run: expandable segments (the default "
                        "here), or PyTorch's default, under which the first ~20 timed replays after a "
                        "large free (the cell before releasing its inputs) measured up to 14 %% slow on "
                        "the H200 (benchmarks/decode_kernels_h200/experiments/clock_state). A "
                        "PYTORCH_CUDA_ALLOC_CONF already set in the environment wins")
    p.add_argument("--copy-mib", type=int, default=None, help="copy probe size (default 2048 on GPU, 64 on CPU)")
    p.add_argument("--gemm-n", type=int, default=None, help="matmul probe size (default 8192 on GPU, 512 on CPU)")
    p.add_argument("--flex-budget-s", type=float, default=45.0, help="seconds of flex_attention compiling (default 45)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--sweep", action="store_true", help="sweep kernel configs on a few cells and print the best")
    p.add_argument("--sweep-cells", default=None,
                   help="cells for --sweep as B:L:S,... (default: a fixed set per path)")
    p.add_argument("--out", required=True, help="output directory (JSON, markdown, PNG)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``decode`` on a subparsers object (gqla_megatron.cli.bench)."""
    d = subparsers.add_parser("decode", help="decode-attention kernels vs stock peers (GPU)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(d)
    d.set_defaults(handler=_cmd_decode, subparser=d)
    return d


def add_targets_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``targets`` (issue #6's targets over saved runs) on a subparsers object."""
    t = subparsers.add_parser(
        "targets", help="issue #6's decode targets over saved `gqla-bench decode` runs",
        description="Read decode_bench.json files (or the --out folders holding them) of earlier "
                    "`gqla-bench decode` runs and print, per run, which cells meet each target of "
                    "issue #6 and the ceiling the run's launch floor leaves each miss (markdown).")
    t.add_argument("runs", nargs="+", help="decode_bench.json files or folders that hold one")
    t.add_argument("--out", default=None, help="also write the markdown to this file")
    t.set_defaults(handler=_cmd_targets, subparser=t)
    return t


def _cmd_targets(args, parser) -> int:
    files = [os.path.join(r, "decode_bench.json") if os.path.isdir(r) else r for r in args.runs]
    if missing := [f for f in files if not os.path.isfile(f)]:
        parser.error(f"no decode_bench.json at {', '.join(missing)}")
    lines = []
    for f in files:
        with open(f) as fh:
            try:
                res = json.load(fh)
            except json.JSONDecodeError as e:
                parser.error(f"{f} is not JSON: {e}")
        if not isinstance(res, dict) or not {"summary", "rows", "rates", "shapes"} <= set(res):
            parser.error(f"{f} is not a `gqla-bench decode` result (summary, rows, rates, shapes)")
        per = f"per layer of {res['layers']}" if res.get("layers", 1) > 1 else "one call"
        lines += targets_markdown(res, title=f"## {f} ({res.get('shapes_name')}, {per}"
                                             f"{'' if res.get('complete', True) else ', INCOMPLETE'})")
    text = "\n".join(lines)
    print(text)
    if args.out:
        _write_atomic(args.out, text + "\n")
    return 0


def _cmd_decode(args, parser) -> int:
    try:
        grid = dict(batch=_parse_list(args.batch), context=_parse_list(args.context), s_q=_parse_list(args.s_q),
                    path=_parse_list(args.path, str))
        peers = _parse_list(args.peers, str)
    except ValueError as e:
        parser.error(str(e))
    for k in ("batch", "context", "s_q"):
        if not grid[k] or any(v <= 0 for v in grid[k]):
            parser.error(f"--{k.replace('_', '-')} needs positive integers, got {getattr(args, k)}")
    if bad := [p for p in grid["path"] if p not in ("absorb", "gqa")]:
        parser.error(f"--path: unknown {bad}; choose from absorb, gqa")
    if bad := [p for p in peers if p not in PEERS]:
        parser.error(f"--peers: unknown {bad}; choose from {', '.join(PEERS)}")
    if bad := [(B, L, S) for B in grid["batch"] for L in grid["context"] for S in grid["s_q"] if S > L]:
        parser.error(f"s_q must not exceed the context L: {bad[:3]}")
    for k in ("warmup", "iters", "page_size", "layers"):
        if getattr(args, k) < (1 if k in ("iters", "layers") else 0):
            parser.error(f"--{k.replace('_', '-')} must be >= {1 if k in ('iters', 'layers') else 0}")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    os.makedirs(args.out, exist_ok=True)
    args.alloc_conf = _set_allocator(args.allocator) if dev.type == "cuda" else None
    shp = Shapes(**SHAPES[args.shapes])
    dtype = DTYPES[args.dtype]
    _FLEX["budget_s"] = args.flex_budget_s
    on_gpu = dev.type == "cuda"
    if args.cuda_graphs is None:
        args.cuda_graphs = on_gpu
    elif args.cuda_graphs and not on_gpu:
        parser.error("--cuda-graphs needs a CUDA device")
    rates = measure_rates(dev, copy_mib=args.copy_mib or (2048 if on_gpu else 64),
                          gemm_n=args.gemm_n or (8192 if on_gpu else 512))
    print(f"device {torch.cuda.get_device_name(dev) if on_gpu else 'cpu'}: copy {rates['copy_tbps']:.3f} TB/s, "
          f"{rates['gemm_dtype']} matmul {rates['gemm_tflops']:.1f} TFLOP/s", flush=True)
    flush = L2Flush(dev, args.l2_flush) if (args.flush and on_gpu) else None
    if on_gpu and args.cuda_graphs:
        rates.update(measure_launch_floor(dev, flush, iters=max(10, args.iters), layers=args.layers))
        print(f"launch floor (graph replay, events, flush as the cells): one tiny kernel "
              f"{rates['floor1_us']:.1f} us, two {rates['floor2_us']:.1f} us"
              + (f"; per layer of {args.layers}: {rates['floor1_layer_us']:.2f} / {rates['floor2_layer_us']:.2f} us"
                 if args.layers > 1 else ""), flush=True)
    if args.sweep:
        res = run_sweep(args, shp, dtype, dev, rates, flush)
        _write_atomic(os.path.join(args.out, "decode_sweep.json"),
                      json.dumps({"rates": rates, "shapes": dataclasses.asdict(shp), "sweep": res}, indent=1))
        print(f"wrote {os.path.join(args.out, 'decode_sweep.json')}")
        return 0
    kernels = [k for k in _parse_list(args.kernels, str) if not (args.no_triton and k == "triton")]
    if bad := [k for k in kernels if k not in KERNELS]:
        parser.error(f"--kernels: unknown {bad}; choose from {', '.join(KERNELS)}")
    methods = kernels + peers
    rows = []
    t0 = time.time()
    for path in grid["path"]:
        for S in grid["s_q"]:
            for B in grid["batch"]:
                for L in grid["context"]:
                    cell = run_cell(path, shp, B, L, S, dtype, dev, args, rates, flush, methods)
                    rows += cell
                    msg = " ".join(f"{r['method']}={r['time_us']:.1f}us/{r['tbps']:.2f}TB/s" if r["status"] == "ok"
                                   else f"{r['method']}={r['status']}" for r in cell)
                    print(f"[{time.time() - t0:6.1f}s] {path} B={B} L={L} s_q={S}: {msg}", flush=True)
                    # rewritten after every cell: a run cut short by a time limit keeps its cells
                    result = _write_results(args, dev, shp, rates, flush, rows, complete=False)
    result = _write_results(args, dev, shp, rates, flush, rows, complete=True)
    msg = plot(result, os.path.join(args.out, "decode_bench.png"))
    print(f"wrote {args.out}/decode_bench.json, decode_bench.md" + (f"; {msg}" if msg else ", decode_bench.png"))
    return 0


def _set_allocator(choice: str) -> str:
    """Apply ``--allocator`` before the run's first CUDA allocation; the setting in effect."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if conf is not None:
        return conf
    if choice == "expandable":
        conf = "expandable_segments:True"
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
        torch.cuda.memory._set_allocator_settings(conf)   # in case this process allocated already
        return conf
    return ""


def _write_results(args, dev, shp, rates, flush, rows, *, complete: bool) -> dict:
    on_gpu = dev.type == "cuda"
    result = {"device": torch.cuda.get_device_name(dev) if on_gpu else "cpu", "torch": torch.__version__,
              "triton": _triton_version(), "shapes_name": args.shapes, "shapes": dataclasses.asdict(shp),
              "dtype": args.dtype, "page_size": args.page_size, "warmup": args.warmup, "iters": args.iters,
              "cuda_graphs": bool(args.cuda_graphs), "complete": complete, "layers": args.layers,
              "alloc_conf": getattr(args, "alloc_conf", None),
              "flush": bool(flush is not None), "l2_flush": flush.mode if flush is not None else None, "rates": rates, "argv": sys.argv[1:], "rows": rows,
              "summary": summarize(rows), "env": {k: v for k, v in os.environ.items() if k.startswith("GQLA_DECODE_")}}
    _write_atomic(os.path.join(args.out, "decode_bench.json"), json.dumps(result, indent=1))
    _write_atomic(os.path.join(args.out, "decode_bench.md"), markdown(result))
    return result


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="gqla-bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    args = p.parse_args(argv)
    return _cmd_decode(args, p)


if __name__ == "__main__":
    sys.exit(main())
