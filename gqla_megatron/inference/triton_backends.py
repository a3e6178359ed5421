"""Triton and TileLang decode backends (kernels in gqla_megatron.kernels).

  tilelang_absorb  MQA-absorb path on Hopper: the warp-specialised TileLang latent kernel
                   (kernels/tilelang_decode.py) where it measured faster -- 32+ query rows
                   (heads x s_q) from ``MIN_TOKENS`` cached tokens (B x max_len), 16-31 rows
                   from ``MIN_TOKENS_FEW_ROWS``; contiguous or 64-token-aligned pages -- else the Triton
                   latent kernel; the choice is a fixed function of the shapes
                   (``tilelang_decode.prefers``), so a captured CUDA graph replays one kernel.
  triton_absorb    MQA-absorb path: W_UK folded into the query per group (a small torch GEMM),
                   the split-KV latent kernel, W_UV applied to the latent output (torch GEMM).
  triton_gqa       GQA path: the split-KV per-group kernel (shared RoPE key read by each group).

This module imports triton and tilelang only inside ``supported`` / ``attend``, so a machine
without them still imports the registry; the backends then report why they cannot run and
``select_backend`` falls back (tilelang -> triton -> stock torch). It does not import backends.py
either: backends.py builds the ``DecodeBackend`` subclasses with ``backend_classes(DecodeBackend)``
when it builds its registry (so either module may be imported first); ``TileLangAbsorb`` /
``TritonAbsorb`` / ``TritonGQA`` here resolve to those registered classes.

Cache dicts: the stock contiguous layouts (see backends.py), or paged -- the same keys holding
page pools (num_blocks, block_size, ...) plus ``"block_table"`` (B, max_blocks) int32. An
optional ``"max_len"`` (int) bounds lengths + S for the split heuristic (default: capacity).
The engine guarantees lengths + S <= capacity, so ``attend`` does not re-check it on the host
(that would cost a device sync per layer); the kernels never read past the capacity anyway.

Warm-up (``warmup``, called by the engine at load): Triton compiles a kernel variant at the
first launch that needs it -- seconds each, 3.45 s measured in an H200 engine's first decode
step -- and which variants a call needs depends on its batch, query count and split count. So
the Triton backends run ``attend`` itself once per launch configuration of
``triton_decode.warmup_plan`` (every batch up to max_batch, every s_q) on dummy inputs with the
real layouts; tilelang_absorb compiles the TileLang kernels its calls use and runs its own calls
too (their split outputs merge in the Triton combine kernel) as well as those ``prefers`` leaves
to Triton. What the warm-up is not told can still need a compile in a decode step: a cache
dict's ``"max_len"``, other page sizes, other cache layouts. (The engine's own caches -- also
after ``switch_path``, which converts into the same contiguous layouts -- are what it is told.)
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from gqla_megatron import reference as ref
from gqla_megatron.config import GQLAConfig


def _kernels():
    from gqla_megatron.kernels import triton_decode

    return triton_decode


class _TritonBackend:
    """Capability checks shared by both Triton backends (mixed into DecodeBackend)."""

    name: str = ""
    path: str = ""

    @classmethod
    def supported(cls, cfg: GQLAConfig, device: torch.device, dtype: torch.dtype) -> List[str]:
        try:
            td = _kernels()
        except Exception as e:  # ImportError, or a broken triton install
            return [f"triton not importable ({type(e).__name__}: {e})"]
        problems = td.device_problems(torch.device(device), dtype)
        problems += td.shape_problems(
            cls.path, heads=cfg.num_attention_heads, groups=cfg.num_query_groups,
            kv_lora_rank=cfg.kv_lora_rank, qk_head_dim=cfg.qk_head_dim,
            rope_dim=cfg.qk_pos_emb_head_dim, v_head_dim=cfg.v_head_dim)
        return problems

    def warmup(self, cfg, device, dtype, *, max_batch, capacity, s_q, len_dtype, page=0):
        """Compile the Triton kernel variants of every decode call up to these sizes at load."""
        return self._warm_triton(cfg, device, dtype, max_batch=max_batch, capacity=capacity,
                                 s_q=s_q, len_dtype=len_dtype, page=page)

    def _warm_triton(self, cfg: GQLAConfig, device, dtype: torch.dtype, *, max_batch: int,
                     capacity: int, s_q: Sequence[int], len_dtype: torch.dtype, page: int,
                     runs: Optional[Callable[[int, int], bool]] = None,
                     calls: Optional[list] = None, label: str = "triton") -> List[str]:
        """Run ``attend`` -- this backend's own decode code, kernel choice included -- once per
        planned call (``calls``, default ``triton_decode.warmup_plan`` of these sizes; ``runs``:
        which (batch, s_q) calls they cover; ``label`` names them in the returned lines), on dummy
        inputs laid out as
        the engine's: one layer's cache of max_batch sequences x
        ``capacity`` slots (``page`` > 0: a page pool and an int32 block table) sliced to each
        batch, so strides are the real ones; all lengths 0 (the kernels read only the s_q new
        slots); queries as ``ref.queries_from_latent`` makes them; constants from ``prepare``.
        Zeros, not torch.empty: the memset is cheap and no garbage NaN / Inf flows through the
        arithmetic. Memory: that one layer's cache plus the calls' own buffers, back to torch's
        allocator when this returns. Returns what it compiled, per s_q."""
        td = _kernels()
        device = torch.device(device)
        for field, v, low in (("max_batch", max_batch, 1), ("capacity", capacity, 1), ("page", page, 0)):
            if v < low:
                raise ValueError(f"{field} must be >= {low}, got {v}")
        blocks = -(-capacity // page) if page else 0
        cap = blocks * page if page else capacity
        H, G = cfg.num_attention_heads, cfg.num_query_groups
        N, R, V, C = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if calls is None:
            calls = td.warmup_plan(self.path, max_batch=max_batch, s_q=s_q, heads=H, groups=G,
                                   width=C if self.path == "absorb" else V, max_len=cap, dtype=dtype,
                                   sms=td.num_sms(device), runs=runs)
        if not calls:
            return []
        kw = dict(device=device, dtype=dtype)
        prep = self.prepare(ref.GQLAWeights(None, None, None, torch.zeros(G * (N + V), C, **kw), None),
                            cfg)   # prepare reads W_UKV only
        lead = (max_batch * blocks, page) if page else (max_batch, capacity)
        if self.path == "absorb":
            cache = {"c": torch.zeros(*lead, C, **kw), "k_rope": torch.zeros(*lead, R, **kw)}
        else:
            cache = {"k_nope": torch.zeros(*lead, G, N, **kw), "v": torch.zeros(*lead, G, V, **kw),
                     "k_rope": torch.zeros(*lead, R, **kw)}
        if page:
            cache["block_table"] = torch.arange(max_batch * blocks, dtype=torch.int32,
                                                device=device).view(max_batch, blocks)
        lengths = torch.zeros(max_batch, dtype=len_dtype, device=device)
        with torch.no_grad():
            for call in calls:
                B, S = call.batch, call.s_q
                sliced = {k: t[:B] if k == "block_table" or not page else t for k, t in cache.items()}
                q_nope, q_rope = _dummy_queries(cfg, B, S, device, dtype)
                self.attend(prep, q_nope, q_rope, sliced, lengths[:B], cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)   # a failing launch fails the load, not decode step 1
        done = []
        for S in sorted({c.s_q for c in calls}):
            mine = [c for c in calls if c.s_q == S]
            served = sum(1 for b in range(1, max_batch + 1) if runs is None or runs(b, S))
            splits = ", ".join(str(n) for n in sorted({c.num_splits for c in mine}))
            done.append(f"{label} {self.path} kernels (s_q {S}, {dtype}, page {page}, lengths {len_dtype}): "
                        f"{len(mine)} launch configurations for {served} batch sizes up to {max_batch}, "
                        f"splits {splits}")
        return done


def _dummy_queries(cfg: GQLAConfig, B: int, S: int, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q_nope, q_rope) of B x S tokens laid out as ``ref.queries_from_latent`` makes them: q_nope
    a view of one (B, S, H, d_n + d_r) projection, q_rope the RoPE rotation's own output."""
    H, N, R = cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim
    q = torch.zeros(B, S, H * (N + R), device=device, dtype=dtype).view(B, S, H, N + R)
    cos, sin = ref.rope_angles(torch.zeros(B, S, dtype=torch.long, device=device), R, cfg.rotary_base, dtype)
    return q[..., :N], ref.rotate(q[..., N:], cos, sin)


class _TritonAbsorb(_TritonBackend):
    """MQA-absorb path on the Triton latent kernel (W_UK / W_UV GEMMs in torch)."""

    name, path = "triton_absorb", "absorb"

    def _kernel(self, cache, lengths, batch: int, rows: int):
        """The kernel module whose ``absorb_decode`` serves a call of these sizes."""
        return _kernels()

    def attend(self, prep, q_nope, q_rope, cache, lengths, cfg):
        B, S, H, _ = q_nope.shape
        G, M = cfg.num_query_groups, cfg.heads_per_group
        q_abs = ref.absorb_query(q_nope, prep["W_UK"])
        o_lat = self._kernel(cache, lengths, B, S * H).absorb_decode(
            q_abs.reshape(B, S, H, -1), q_rope, cache["c"], cache["k_rope"], lengths,
            cfg.softmax_scale, block_table=cache.get("block_table"), max_len=cache.get("max_len"),
            validate=False)
        return ref.absorb_output(o_lat.view(B, S, G, M, -1), prep["W_UV"])


class _TileLangAbsorb(_TritonAbsorb):
    """MQA-absorb path on the warp-specialised TileLang kernel (sm_90), Triton below its size."""

    name, path = "tilelang_absorb", "absorb"

    @classmethod
    def supported(cls, cfg: GQLAConfig, device: torch.device, dtype: torch.dtype) -> List[str]:
        from gqla_megatron.kernels import tilelang_decode as tld

        problems = tld.absorb_problems(device, dtype, kv_lora_rank=cfg.kv_lora_rank,
                                       rope_dim=cfg.qk_pos_emb_head_dim)
        # the Triton kernel serves the small grids: it must run too
        return problems + [f"triton fallback: {p}" for p in super().supported(cfg, device, dtype)]

    def warmup(self, cfg, device, dtype, *, max_batch, capacity, s_q, len_dtype, page=0):
        """Compile at load what decode calls up to these sizes will run: the TileLang kernels
        (direct and / or split, whichever of them the calls TileLang serves use: ~40 s each on a
        fresh H200 host, then TileLang's disk cache), the Triton combine variants of its split
        calls, and the Triton kernel variants of the calls ``prefers`` leaves to Triton."""
        from gqla_megatron.kernels import tilelang_decode as tld

        td = _kernels()
        H = cfg.num_attention_heads
        # the capacity _kernel sees: whole pages; its block table is int32, as the warm-up's
        cap = -(-capacity // page) * page if page else capacity
        served = lambda b, s: tld.prefers(b, H * s, cap, page, len_dtype)  # noqa: E731
        plan = tld.warmup_plan("absorb", max_batch=max_batch, s_q=s_q, heads=H, groups=1,
                               width=cfg.kv_lora_rank, max_len=cap, dtype=dtype,
                               sms=td.num_sms(torch.device(device)), runs=served)
        args = tld.kernel_args(cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim, dtype, len_dtype, page)
        done = []
        for direct in sorted({c.num_splits == 1 for c in plan}, reverse=True):
            tld.compile_absorb(direct=direct, **args)
            done.append(f"tilelang absorb kernel ({'direct' if direct else 'split'}, page {page}, "
                        f"{dtype}, lengths {len_dtype})")
        common = dict(max_batch=max_batch, capacity=capacity, s_q=s_q, len_dtype=len_dtype, page=page)
        # the calls TileLang serves merge their splits with the Triton combine kernel: its variants
        # follow this kernel's split counts (a GPU test caught them compiling in a decode step)
        done += self._warm_triton(cfg, device, dtype, **common, calls=plan, runs=served,
                                  label="tilelang (+ triton combine)")
        return done + self._warm_triton(cfg, device, dtype, **common,
                                        runs=lambda b, s: not served(b, s))

    def _kernel(self, cache, lengths, batch: int, rows: int):
        from gqla_megatron.kernels import tilelang_decode as tld

        c, table = cache["c"], cache.get("block_table")
        page = c.shape[1] if table is not None else 0
        cap = table.shape[1] * page if table is not None else c.shape[1]
        if tld.prefers(batch, rows, cache.get("max_len") or cap, page, lengths.dtype, table):
            return tld
        return _kernels()


class _TritonGQA(_TritonBackend):
    """GQA path on the Triton per-group kernel."""

    name, path = "triton_gqa", "gqa"

    def prepare(self, w, cfg):
        return {}

    def attend(self, prep, q_nope, q_rope, cache, lengths, cfg):
        return _kernels().gqa_decode(
            q_nope, q_rope, cache["k_nope"], cache["v"], cache["k_rope"], lengths,
            cfg.softmax_scale, block_table=cache.get("block_table"), max_len=cache.get("max_len"),
            validate=False)


def backend_classes(base: type) -> Tuple[type, type, type]:
    """(TileLangAbsorb, TritonAbsorb, TritonGQA) as subclasses of ``base`` (backends.DecodeBackend)."""
    made = []
    for impl, cls_name in ((_TileLangAbsorb, "TileLangAbsorb"), (_TritonAbsorb, "TritonAbsorb"),
                           (_TritonGQA, "TritonGQA")):
        made.append(type(cls_name, (impl, base), {"__module__": __name__, "__qualname__": cls_name,
                                                  "__doc__": impl.__doc__}))
    return made[0], made[1], made[2]


def __getattr__(name):
    if name in ("TileLangAbsorb", "TritonAbsorb", "TritonGQA"):
        from gqla_megatron.inference import backends

        return getattr(backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
