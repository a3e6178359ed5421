r"""Roofline cost model of one GQLA decode step and the decode-path selector.

GQLA has one set of weights and two algebraically equal decode paths (docs: gqla-method.md
3.3 / 3.4):

``absorb`` (MQA-absorb, identical to MLA's)
    cache [c ; kR] = r + d_r values per token; ONE latent "KV head" of width r + d_r shared
    by all h_q query heads. High arithmetic intensity (~1.889 h_q s_q FLOP/B).
``gqa`` (GQA with a per-group expanded cache)
    cache kC_j (d_n), v_j (d_v) for the g groups plus the shared RoPE key kR (d_r);
    standard GQA kernel with g KV heads, QK dim d_n + d_r, V dim d_v. Low intensity
    (~1.21 (h_q/g) s_q at canonical dims) but fewer FLOPs.

Which one is faster depends on the device's ridge point FLOP/s / (B/s), on the LOCAL head
count after tensor parallelism and on s_q (1 + MTP drafts), so it is computed, not
hard-coded per GPU name (gqla-method.md 4.4; serving-anchors.md 3).

What is counted (exactly what the paper's Table 2 counts, so that it reproduces):

* FLOPs: only the two attention matmuls QK^T and PV of the s_q query tokens against the L
  cached tokens. The per-token absorb GEMMs (qC -> q~, o~ -> o), the projections, softmax and
  the cache write are NOT counted.
* Bytes: only KV-cache reads (no weights, no activations, no cache write).
* time = max(F / peak FLOP/s, bytes / peak B/s) at 100 % efficiency;
  throughput = batch * s_q / time, i.e. every MTP draft is assumed accepted.

Per decode step, one layer, per rank (B = batch, L = context, h = h_q / tp local heads,
e = dtype_bytes bytes per cached value)::

    absorb:  F = 2 B h s_q L ((r + d_r) + r)         bytes = e B L (r + d_r)
    gqa:     F = 2 B h s_q L ((d_n + d_r) + d_v)     bytes = e B L (g_loc (d_n + d_v) + d_r)
             (rope_layout="once", the paper's count)
                                                     bytes = e B L g_loc (d_n + d_r + d_v)
             (rope_layout="per-group", the layout of stock GQA kernels)
    with g_loc = g / tp.

Tensor parallelism (gqla-method.md 3.8): the absorb path shards the h_q query heads but its
single latent head cannot be sharded along heads, so EVERY rank reads the FULL latent cache
(tp-fold replicated: bytes per rank do not shrink with tp, FLOPs do). The gqa path shards
both the heads and the KV groups (needs g % tp == 0; tp > g would replicate KV heads and is
reported as unsupported here), and the shared RoPE key kR is read by every rank
(replicated), so per-rank bytes are e B L (g/tp (d_n+d_v) + d_r), slightly above 1/tp of the
tp=1 bytes.

Devices: ``DEVICES`` holds vendor peak dense BF16 tensor-core FLOP/s and HBM bandwidth (no
2:4 sparsity). ``lookup_device`` also accepts ``torch.cuda.get_device_name()`` strings;
``probe_device`` measures an unknown device (matmul + device-to-device copy).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

from gqla_megatron.config import GQLAConfig

__all__ = [
    "DeviceSpec", "DEVICES", "known_device_names", "lookup_device", "get_device", "probe_device",
    "device_spec_for", "PathEstimate", "DecodeDecision", "PATHS", "ROPE_LAYOUTS", "REQUESTS",
    "path_problems", "format_rate", "absorb_cost", "gqa_cost", "estimate", "choose_decode_path", "PRESETS",
    "PAPER_TABLE2_ROWS", "PAPER_TABLE2_CONTEXT", "Table2Row", "paper_table2",
]

PATHS: Tuple[str, ...] = ("absorb", "gqa")
"""The two decode paths, in tie-break order (absorb first: smaller cache per token)."""
ROPE_LAYOUTS: Tuple[str, ...] = ("once", "per-group")
"""GQA cache layouts: RoPE key stored once per token (paper) or inside every group's K head."""
REQUESTS: Tuple[str, ...] = ("auto",) + PATHS
"""Allowed values of ``choose_decode_path(requested=...)``."""

_TIE_RTOL = 1e-12


# ---- devices -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceSpec:
    """Peak numbers of one accelerator, as the roofline uses them."""

    name: str
    """Short name, e.g. "H100"; the key of ``DEVICES``."""
    bf16_tflops: float
    """Dense (no 2:4 sparsity) BF16 tensor-core peak, in 1e12 FLOP/s."""
    hbm_tbps: float
    """Peak memory bandwidth, in 1e12 B/s."""
    source: str
    """Where the two numbers come from (paper table, vendor datasheet, measured probe)."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        for fname in ("bf16_tflops", "hbm_tbps"):
            v = getattr(self, fname)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{fname} must be a finite number > 0, got {v!r}")

    @property
    def flops_per_s(self) -> float:
        """Peak FLOP/s."""
        return self.bf16_tflops * 1e12

    @property
    def bytes_per_s(self) -> float:
        """Peak B/s."""
        return self.hbm_tbps * 1e12

    @property
    def ridge(self) -> float:
        """Ridge point I* = FLOP/s / (B/s): above it a kernel is compute-bound."""
        return self.flops_per_s / self.bytes_per_s


@dataclass(frozen=True)
class _NameMatcher:
    """Token rule matching a (normalised) device name to one ``DEVICES`` entry."""

    key: str
    """``DEVICES`` key this rule resolves to."""
    required: frozenset
    """All of these tokens must be present."""
    forbidden: frozenset = frozenset()
    """None of these tokens may be present (other SKUs of the same chip)."""


_DS = "vendor datasheet"
DEVICES: Dict[str, DeviceSpec] = {d.name: d for d in (
    DeviceSpec("H100", 989.0, 3.35,
               "GQLA paper Table 1 (= vendor datasheet, H100 SXM5 80GB: 1979 TFLOP/s with sparsity)"),
    DeviceSpec("H100-PCIe", 756.0, 2.0,
               f"{_DS} (H100 PCIe 80GB: 1513 TFLOP/s with sparsity, 2.0 TB/s HBM2e)"),
    DeviceSpec("H800", 989.0, 3.35,
               f"{_DS} (H800 SXM5; same tensor peak and HBM3 as H100 SXM5); "
               "DeepSeek reports ~865 TFLOP/s under clock throttling"),
    DeviceSpec("H200", 989.0, 4.8,
               f"{_DS} (H200 SXM 141GB: 1979 TFLOP/s with sparsity, 4.8 TB/s HBM3e)"),
    DeviceSpec("H20", 148.0, 4.0, "GQLA paper Table 1 (H20 96GB)"),
    DeviceSpec("A100", 312.0, 2.039, f"{_DS} (A100 SXM4 80GB: 312 TFLOP/s BF16, 2039 GB/s)"),
    DeviceSpec("A100-PCIe-80GB", 312.0, 1.935, f"{_DS} (A100 PCIe 80GB: 1935 GB/s)"),
    DeviceSpec("A100-40GB", 312.0, 1.555, f"{_DS} (A100 40GB, SXM4 or PCIe: 1555 GB/s)"),
    DeviceSpec("L40S", 362.05, 0.864, f"{_DS} (L40S: 733 TFLOP/s with sparsity, 864 GB/s GDDR6)"),
    DeviceSpec("B200", 2250.0, 8.0,
               f"{_DS} (HGX B200 at 1000 W: 4.5 PFLOP/s BF16 with sparsity, 8 TB/s HBM3e)"),
)}

_MATCHERS: Tuple[_NameMatcher, ...] = (
    _NameMatcher("H100-PCIe", frozenset({"H100", "PCIE"})),
    _NameMatcher("H100", frozenset({"H100"}), frozenset({"PCIE", "NVL"})),
    _NameMatcher("H800", frozenset({"H800"}), frozenset({"PCIE", "NVL"})),
    _NameMatcher("H200", frozenset({"H200"}), frozenset({"PCIE", "NVL"})),
    # H20-3e / 141GB parts have different HBM; leave them to the probe.
    _NameMatcher("H20", frozenset({"H20"}), frozenset({"3E", "141GB"})),
    _NameMatcher("A100-40GB", frozenset({"A100", "40GB"})),
    _NameMatcher("A100-PCIe-80GB", frozenset({"A100", "PCIE"}), frozenset({"40GB"})),
    _NameMatcher("A100-PCIe-80GB", frozenset({"A100", "PCIE", "80GB"})),
    _NameMatcher("A100", frozenset({"A100"}), frozenset({"40GB", "PCIE"})),
    _NameMatcher("L40S", frozenset({"L40S"})),
    _NameMatcher("B200", frozenset({"B200"})),
)

_DROP_TOKENS = frozenset({"NVIDIA", "TESLA"})


def _name_tokens(name: str) -> frozenset:
    return frozenset(re.sub(r"[^0-9A-Z]+", " ", name.upper()).split()) - _DROP_TOKENS


def known_device_names() -> Tuple[str, ...]:
    """Keys of ``DEVICES``."""
    return tuple(DEVICES)


def lookup_device(name: str) -> Optional[DeviceSpec]:
    """``DEVICES`` entry for a short name ("H100", "h20") or a ``torch.cuda.get_device_name()``
    string ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"); None if unknown.

    Variants with different peaks (PCIe / NVL cards, H20-3e) do not fall back to the SXM
    entry; the ones not in the table return None (measure them with ``probe_device``).
    """
    if not isinstance(name, str):
        raise ValueError(f"device name must be a string, got {name!r}")
    tokens = _name_tokens(name)
    if not tokens:
        return None
    for key in DEVICES:  # exact short names first, case-insensitive
        if _name_tokens(key) == tokens:
            return DEVICES[key]
    for m in _MATCHERS:
        if m.required <= tokens and not (m.forbidden & tokens):
            return DEVICES[m.key]
    return None


def get_device(device: Union[str, DeviceSpec]) -> DeviceSpec:
    """``device`` itself if it is a DeviceSpec, else ``lookup_device``; raises ValueError
    naming the known devices if the name is unknown."""
    if isinstance(device, DeviceSpec):
        return device
    spec = lookup_device(device)
    if spec is None:
        raise ValueError(
            f"unknown device {device!r}; known devices: {', '.join(DEVICES)} (names such as "
            f"torch.cuda.get_device_name() returns are also accepted); for another device pass a "
            f"DeviceSpec or measure it with gqla_megatron.roofline.probe_device()")
    return spec


def _sync(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _best_seconds(fn, dev, *, warmup: int, iters: int, repeats: int) -> float:
    """Best (over ``repeats``) mean wall time of one ``fn()`` call, synchronised."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(dev)
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def probe_device(device=None, *, matmul_n: Optional[int] = None, copy_mib: Optional[int] = None,
                 iters: Optional[int] = None, repeats: int = 3, name: Optional[str] = None) -> DeviceSpec:
    """Measure a DeviceSpec: a square matmul (bf16 on CUDA, fp32 on CPU) and a device-to-device
    copy, each after warmup and with synchronisation around the timed loop; best of ``repeats``.

    ``device``: torch device or string (default: cuda if available, else cpu).
    ``matmul_n``: matrix size (default 8192 on CUDA, 512 on CPU); FLOPs = 2 n^3 per matmul.
    ``copy_mib``: copied buffer size in MiB (default 1024 on CUDA, 32 on CPU); bytes = 2 x size
    per copy (read + write both counted). CPU defaults finish well under 2 s.

    Measured numbers are below vendor peaks (clocks, random data, copy != pure read); the result
    has ``source="measured probe"``.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    on_gpu = dev.type == "cuda"
    n = matmul_n if matmul_n is not None else (8192 if on_gpu else 512)
    mib = copy_mib if copy_mib is not None else (1024 if on_gpu else 32)
    it = iters if iters is not None else (10 if on_gpu else 3)
    for fname, v in (("matmul_n", n), ("copy_mib", mib), ("iters", it), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{fname} must be a positive integer, got {v!r}")
    dtype = torch.bfloat16 if on_gpu else torch.float32

    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    t_mm = _best_seconds(lambda: torch.matmul(a, b, out=out), dev, warmup=2, iters=it, repeats=repeats)
    del a, b, out

    numel = mib * 2 ** 20 // 4
    src = torch.empty(numel, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t_cp = _best_seconds(lambda: dst.copy_(src), dev, warmup=2, iters=it, repeats=repeats)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst

    if name is None:
        name = torch.cuda.get_device_name(dev) if on_gpu else "cpu"
    kind = "bf16" if on_gpu else "fp32"
    return DeviceSpec(
        name=name,
        bf16_tflops=2.0 * n ** 3 / t_mm / 1e12,
        hbm_tbps=nbytes / t_cp / 1e12,
        source=f"measured probe ({kind} {n}^3 matmul, {mib} MiB copy counted read+write)")


def device_spec_for(device=None, **probe_kwargs) -> DeviceSpec:
    """DeviceSpec of a torch device: the ``DEVICES`` entry matching
    ``torch.cuda.get_device_name()``, else (unknown GPU, or CPU) a ``probe_device`` measurement."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        spec = lookup_device(torch.cuda.get_device_name(dev))
        if spec is not None:
            return spec
    return probe_device(dev, **probe_kwargs)


# ---- cost model ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PathEstimate:
    """Roofline estimate of one decode step of one layer on one rank, for one path."""

    path: str
    """"absorb" or "gqa"."""
    device: str
    """DeviceSpec.name the times are for."""
    s_q: int
    """Query tokens per sequence per step (1 + MTP drafts)."""
    batch: int
    """Sequences per step (each with its own cache of ``context`` tokens)."""
    context: int
    """L: cached tokens per sequence."""
    tp: int
    """Tensor-parallel size; all numbers are per rank."""
    rope_layout: str
    """GQA cache layout ("once" / "per-group"); "once" for absorb (not applicable)."""
    local_heads: int
    """Query heads on this rank: h_q / tp."""
    kv_heads: int
    """KV heads on this rank: 1 latent head (absorb, replicated) or g / tp groups (gqa)."""
    cache_bytes_per_token: float
    """KV-cache bytes per cached token per layer read by this rank."""
    flops: float
    """QK^T + PV FLOPs of the step on this rank."""
    bytes: float
    """KV-cache bytes read by this rank in the step."""
    intensity: float
    """flops / bytes (FLOP/B)."""
    mem_time_s: float
    """bytes / peak B/s."""
    compute_time_s: float
    """flops / peak FLOP/s."""
    step_time_s: float
    """max(mem_time_s, compute_time_s)."""
    tokens_per_s: float
    """batch * s_q / step_time_s (all drafts accepted)."""

    @property
    def bound(self) -> str:
        """"memory" if the memory time dominates (or ties), else "compute"."""
        return "memory" if self.mem_time_s >= self.compute_time_s else "compute"

    @property
    def total_bytes_all_ranks(self) -> float:
        """KV bytes read by all tp ranks together (shows the absorb path's tp-fold replication)."""
        return self.bytes * self.tp

    @property
    def mem_us(self) -> float:
        """mem_time_s in microseconds."""
        return self.mem_time_s * 1e6

    @property
    def compute_us(self) -> float:
        """compute_time_s in microseconds."""
        return self.compute_time_s * 1e6

    @property
    def step_us(self) -> float:
        """step_time_s in microseconds."""
        return self.step_time_s * 1e6


def _check_pos_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_common(cfg, s_q, batch, context, tp, dtype_bytes, rope_layout) -> None:
    if not isinstance(cfg, GQLAConfig):
        raise ValueError(f"cfg must be a GQLAConfig, got {type(cfg).__name__}")
    for fname, v in (("s_q", s_q), ("batch", batch), ("context", context), ("tp", tp)):
        _check_pos_int(fname, v)
    if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, (int, float)) or not dtype_bytes > 0:
        raise ValueError(f"dtype_bytes must be a number > 0, got {dtype_bytes!r}")
    if rope_layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {rope_layout!r}")


def path_problems(cfg: GQLAConfig, path: str, tp: int = 1) -> Tuple[str, ...]:
    """Human-readable reasons why ``path`` cannot run ``cfg`` at tensor-parallel size ``tp``
    (empty if it can)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    _check_pos_int("tp", tp)
    h_q, g = cfg.num_attention_heads, cfg.num_query_groups
    out = []
    if h_q % tp:
        out.append(f"tp={tp} does not divide num_attention_heads (h_q={h_q}): query heads are "
                   f"sharded h_q/tp per rank")
    if path == "gqa" and g % tp:
        extra = (f"; tp > g would need KV heads replicated across ranks, which this model does "
                 f"not cover") if tp > g else ""
        out.append(f"num_query_groups (g={g}) is not divisible by tp={tp}: the GQA path shards "
                   f"the KV groups g/tp per rank{extra}; use a tp that divides g")
    return tuple(out)


def _finish(path, dev, cfg, s_q, batch, context, tp, rope_layout, kv_heads, cache_elems,
            flops_per_qk, dtype_bytes) -> PathEstimate:
    h_loc = cfg.num_attention_heads // tp
    flops = 2.0 * batch * h_loc * s_q * context * flops_per_qk
    cache_bytes = dtype_bytes * cache_elems
    nbytes = float(batch * context) * cache_bytes
    t_mem = nbytes / dev.bytes_per_s
    t_cmp = flops / dev.flops_per_s
    step = max(t_mem, t_cmp)
    return PathEstimate(
        path=path, device=dev.name, s_q=s_q, batch=batch, context=context, tp=tp,
        rope_layout=rope_layout, local_heads=h_loc, kv_heads=kv_heads,
        cache_bytes_per_token=cache_bytes, flops=flops, bytes=nbytes, intensity=flops / nbytes,
        mem_time_s=t_mem, compute_time_s=t_cmp, step_time_s=step, tokens_per_s=batch * s_q / step)


def absorb_cost(cfg: GQLAConfig, device: Union[str, DeviceSpec], *, context: int, s_q: int = 1,
                batch: int = 1, tp: int = 1, dtype_bytes: float = 2) -> PathEstimate:
    """MQA-absorb path (gqla-method.md 3.3): F = 2 B (h_q/tp) s_q L ((r + d_r) + r),
    bytes = dtype_bytes B L (r + d_r). The latent cache is NOT sharded by tp: every rank reads
    all of it. Raises ValueError if tp does not divide h_q."""
    _check_common(cfg, s_q, batch, context, tp, dtype_bytes, "once")
    probs = path_problems(cfg, "absorb", tp)
    if probs:
        raise ValueError("absorb path unsupported: " + "; ".join(probs))
    dev = get_device(device)
    r, d_r = cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim
    return _finish("absorb", dev, cfg, s_q, batch, context, tp, "once", 1, r + d_r,
                   (r + d_r) + r, dtype_bytes)


def gqa_cost(cfg: GQLAConfig, device: Union[str, DeviceSpec], *, context: int, s_q: int = 1,
             batch: int = 1, tp: int = 1, dtype_bytes: float = 2,
             rope_layout: str = "once") -> PathEstimate:
    """GQA path (gqla-method.md 3.4): F = 2 B (h_q/tp) s_q L ((d_n + d_r) + d_v); per rank the
    cache of its g/tp groups is read, plus the shared RoPE key, which EVERY rank reads
    (replicated): bytes = dtype_bytes B L ((g/tp)(d_n + d_v) + d_r) for ``rope_layout="once"``
    (the paper's count), or dtype_bytes B L (g/tp)(d_n + d_r + d_v) for ``"per-group"`` (RoPE
    key stored in every group's K head, as stock GQA kernels do). Raises ValueError if
    g % tp != 0 or tp does not divide h_q."""
    _check_common(cfg, s_q, batch, context, tp, dtype_bytes, rope_layout)
    probs = path_problems(cfg, "gqa", tp)
    if probs:
        raise ValueError("gqa path unsupported: " + "; ".join(probs))
    dev = get_device(device)
    g_loc = cfg.num_query_groups // tp
    d_n, d_r, d_v = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
    if rope_layout == "once":
        elems = g_loc * (d_n + d_v) + d_r
    else:
        elems = g_loc * (d_n + d_r + d_v)
    return _finish("gqa", dev, cfg, s_q, batch, context, tp, rope_layout, g_loc, elems,
                   (d_n + d_r) + d_v, dtype_bytes)


def estimate(cfg: GQLAConfig, device: Union[str, DeviceSpec], path: str, **kw) -> PathEstimate:
    """``absorb_cost`` or ``gqa_cost`` by name (``rope_layout`` is ignored for absorb)."""
    if path == "absorb":
        kw.pop("rope_layout", None)
        return absorb_cost(cfg, device, **kw)
    if path == "gqa":
        return gqa_cost(cfg, device, **kw)
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


# ---- selector --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeDecision:
    """Which decode path to run, with the predictions behind the choice."""

    path: str
    """The chosen path, "absorb" or "gqa"."""
    requested: str
    """What was asked for: "auto", "absorb" or "gqa"."""
    device: DeviceSpec
    """Device the predictions are for."""
    estimates: Mapping[str, Optional[PathEstimate]]
    """Prediction per path (both keys present); None for a path that is unsupported."""
    reasons: Mapping[str, Tuple[str, ...]]
    """Per path that was NOT chosen: why (unsupported, slower, tie, not requested)."""
    notes: Tuple[str, ...] = ()
    """Extra remarks, e.g. an explicitly requested path predicted slower than the other."""

    @property
    def chosen(self) -> PathEstimate:
        """Estimate of the chosen path."""
        return self.estimates[self.path]

    @property
    def absorb(self) -> Optional[PathEstimate]:
        """Estimate of the absorb path (None if unsupported)."""
        return self.estimates["absorb"]

    @property
    def gqa(self) -> Optional[PathEstimate]:
        """Estimate of the gqa path (None if unsupported)."""
        return self.estimates["gqa"]

    def summary(self) -> str:
        """Multi-line human-readable report."""
        lines = [f"device {self.device.name} ({self.device.bf16_tflops:g} TFLOP/s, "
                 f"{self.device.hbm_tbps:g} TB/s, ridge {self.device.ridge:.1f} FLOP/B); "
                 f"requested={self.requested} -> chosen: {self.path}"]
        for p in PATHS:
            e = self.estimates[p]
            if e is None:
                lines.append(f"  {p:6s}: unsupported")
            else:
                lines.append(f"  {p:6s}: I={e.intensity:.1f} mem {e.mem_us:.2f} us, cmp "
                             f"{e.compute_us:.2f} us, step {e.step_us:.2f} us ({e.bound}-bound), "
                             f"{_fmt_tps(e.tokens_per_s)}")
            for r in self.reasons.get(p, ()):
                lines.append(f"          - {r}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def format_rate(x: float) -> str:
    """Tokens/s with a K / M suffix, e.g. 354979.4 -> "355.0K"."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}K"
    return f"{x:.3g}"


def _fmt_tps(x: float) -> str:
    return f"{format_rate(x)} tok/s"


def choose_decode_path(cfg: GQLAConfig, device: Union[str, DeviceSpec], *, s_q: int, batch: int,
                       context: int, tp: int = 1, requested: str = "auto", dtype_bytes: float = 2,
                       rope_layout: str = "once") -> DecodeDecision:
    """Pick the decode path by predicted roofline throughput (tokens per second per TP group).

    ``requested="auto"``: the supported path with the higher predicted tokens_per_s; ties go to
    absorb (smaller cache per token). ``"absorb"`` / ``"gqa"``: that path, or ValueError listing
    the reasons if it is unsupported (e.g. gqa with g % tp != 0, or tp not dividing h_q).
    Unknown ``requested`` values raise ValueError naming the allowed ones.
    """
    if requested not in REQUESTS:
        raise ValueError(f"requested must be one of {REQUESTS}, got {requested!r}")
    _check_common(cfg, s_q, batch, context, tp, dtype_bytes, rope_layout)
    dev = get_device(device)
    problems = {p: path_problems(cfg, p, tp) for p in PATHS}
    kw = dict(s_q=s_q, batch=batch, context=context, tp=tp, dtype_bytes=dtype_bytes,
              rope_layout=rope_layout)
    est = {p: (None if problems[p] else estimate(cfg, dev, p, **kw)) for p in PATHS}
    reasons: Dict[str, Tuple[str, ...]] = {}
    notes = []

    if requested != "auto":
        if problems[requested]:
            raise ValueError(f"requested decode path {requested!r} is unsupported for tp={tp}: "
                             + "; ".join(problems[requested]))
        chosen = requested
        other = PATHS[1 - PATHS.index(chosen)]
        reasons[other] = problems[other] or (f"not requested (requested={requested!r})",)
        if est[other] is not None and est[other].tokens_per_s > est[chosen].tokens_per_s * (1 + _TIE_RTOL):
            notes.append(f"{other} is predicted faster: {_fmt_tps(est[other].tokens_per_s)} vs "
                         f"{_fmt_tps(est[chosen].tokens_per_s)} for the requested {chosen}")
    else:
        ok = [p for p in PATHS if not problems[p]]
        if not ok:
            raise ValueError("no decode path is supported: " + "; ".join(
                f"{p}: " + "; ".join(problems[p]) for p in PATHS))
        if len(ok) == 1:
            chosen = ok[0]
            other = PATHS[1 - PATHS.index(chosen)]
            reasons[other] = problems[other]
        else:
            a, g = est["absorb"], est["gqa"]
            if g.tokens_per_s > a.tokens_per_s * (1 + _TIE_RTOL):
                chosen, loser = "gqa", "absorb"
            else:
                chosen, loser = "absorb", "gqa"
            w, l = est[chosen], est[loser]
            if l.tokens_per_s >= w.tokens_per_s * (1 - _TIE_RTOL):
                reasons[loser] = (f"tie with absorb at {_fmt_tps(w.tokens_per_s)}; ties go to "
                                  f"absorb (smaller cache per token)",)
            else:
                reasons[loser] = (
                    f"predicted {_fmt_tps(l.tokens_per_s)} < {chosen}'s {_fmt_tps(w.tokens_per_s)} "
                    f"({w.tokens_per_s / l.tokens_per_s:.2f}x); {loser} is {l.bound}-bound at "
                    f"I={l.intensity:.1f} vs ridge {dev.ridge:.1f} (step {l.step_us:.2f} us vs "
                    f"{w.step_us:.2f} us)",)
    return DecodeDecision(path=chosen, requested=requested, device=dev, estimates=est,
                          reasons=reasons, notes=tuple(notes))


# ---- presets and the paper's Table 2 ------------------------------------------------------------

PRESETS: Dict[str, GQLAConfig] = {
    # DeepSeek-V3 shapes with g KV groups: the paper's canonical config (gqla-method.md 2).
    "canonical-g8": GQLAConfig(hidden_size=7168, num_attention_heads=128, num_query_groups=8,
                               kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
                               v_head_dim=128, q_lora_rank=1536),
    "canonical-g4": GQLAConfig(hidden_size=7168, num_attention_heads=128, num_query_groups=4,
                               kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
                               v_head_dim=128, q_lora_rank=1536),
    # TransGQLA LLaMA-3-8B (gqla-method.md 4.1 / 4.4).
    "llama3-8b": GQLAConfig(hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                            kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
                            v_head_dim=128, q_lora_rank=None, rotary_base=500000.0),
}

PAPER_TABLE2_CONTEXT = 8192
"""L of the paper's Table 2."""

PAPER_TABLE2_ROWS: Tuple[Tuple[str, str, int, int], ...] = (
    ("H100", "absorb", 8, 1), ("H100", "absorb", 8, 2),
    ("H20", "absorb", 8, 1), ("H20", "absorb", 8, 2),
    ("H20", "gqa", 8, 1), ("H20", "gqa", 8, 2),
    ("H20", "gqa", 4, 1), ("H20", "gqa", 4, 2),
)
"""Layout of Table 2 (gqla-method.md 4.3): (GPU, path, model g, s_q). Only the layout; every
value is computed. For absorb rows the table's g column shows the 1 latent KV head."""


@dataclass(frozen=True)
class Table2Row:
    """One computed row of the paper's Table 2 (canonical dims, L=8192, BF16, batch 1, tp 1)."""

    gpu: str
    """Device name."""
    path: str
    """"absorb" (the paper's "MQA-absorb") or "gqa"."""
    g: int
    """KV heads read: 1 for absorb, g for gqa (the table's g column)."""
    s_q: int
    """Query tokens per step."""
    cache_bytes_per_token: float
    """KV-cache bytes per token per layer."""
    intensity: float
    """FLOP/B."""
    mem_us: float
    """Memory time, microseconds."""
    cmp_us: float
    """Compute time, microseconds."""
    step_us: float
    """max(mem, cmp), microseconds."""
    tokens_per_s: float
    """s_q / step."""


def paper_table2(rope_layout: str = "once",
                 rows: Sequence[Tuple[str, str, int, int]] = PAPER_TABLE2_ROWS) -> Tuple[Table2Row, ...]:
    """Recompute Table 2 from the formulas; ``rope_layout="per-group"`` gives the physical-layout
    variant discussed after the table."""
    out = []
    for gpu, path, g, s_q in rows:
        cfg = PRESETS[f"canonical-g{g}"] if g in (4, 8) else _canonical(g)
        e = estimate(cfg, gpu, path, s_q=s_q, batch=1, context=PAPER_TABLE2_CONTEXT, tp=1,
                     rope_layout=rope_layout)
        out.append(Table2Row(gpu=gpu, path=path, g=e.kv_heads, s_q=s_q,
                             cache_bytes_per_token=e.cache_bytes_per_token, intensity=e.intensity,
                             mem_us=e.mem_us, cmp_us=e.compute_us, step_us=e.step_us,
                             tokens_per_s=e.tokens_per_s))
    return tuple(out)


def _canonical(g: int) -> GQLAConfig:
    base = PRESETS["canonical-g8"]
    return GQLAConfig(**{**base.to_dict(), "num_query_groups": g})
