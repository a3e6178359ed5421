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
"""

from __future__ import annotations

from typing import List, Tuple

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
        """Compile the TileLang kernels (split and direct: ~40 s each on a fresh H200 host, then
        TileLang's disk cache) at load when some decode call up to these sizes will run them."""
        from gqla_megatron.kernels import tilelang_decode as tld

        rows = cfg.num_attention_heads * max(s_q)
        if not tld.prefers(max_batch, rows, capacity, page, len_dtype):
            return []
        args = tld.kernel_args(cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim, dtype, len_dtype, page)
        done = []
        for direct in (True, False):
            tld.compile_absorb(direct=direct, **args)
            done.append(f"tilelang absorb kernel ({'direct' if direct else 'split'}, page {page}, "
                        f"{dtype}, lengths {len_dtype})")
        return done

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
