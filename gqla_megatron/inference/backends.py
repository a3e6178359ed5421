"""Decode attention backends. Chosen once at load (never inside forward) from a registry;
each says why it cannot run (``supported`` returns reasons, empty = OK).

Stock PyTorch backends (any device):
  torch_absorb  MQA-absorb path: latent cache [c ; kR]; W_UK folded into the query and W_UV
                applied to the latent output, both per GROUP (prepared once at load).
  torch_gqa     GQA path: per-group K (d_n) / V (d_v) cache, the shared RoPE key stored once.
Kernel backends (triton_backends.py): tilelang_absorb (Hopper), triton_absorb, triton_gqa.

Shapes: B batch, T cache capacity, S new query tokens per step (1, or s_q >= 2 when verifying
multi-token-prediction drafts), H heads, G groups, M = H/G.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from gqla_megatron import reference as ref
from gqla_megatron.config import GQLAConfig
from gqla_megatron.reference import GQLAWeights


class DecodeBackend:
    """One attention implementation for one decode path."""

    name: str = ""
    path: str = ""  # "absorb" or "gqa"

    @classmethod
    def supported(cls, cfg: GQLAConfig, device: torch.device, dtype: torch.dtype) -> List[str]:
        return []

    def prepare(self, w: GQLAWeights, cfg: GQLAConfig) -> dict:
        """Per-layer constants derived from the weights, computed once at load."""
        return {"W_UK": w.W_UK(cfg).contiguous(), "W_UV": w.W_UV(cfg).contiguous()}

    def warmup(self, cfg: GQLAConfig, device: torch.device, dtype: torch.dtype, *, max_batch: int,
               capacity: int, s_q: Sequence[int], len_dtype: torch.dtype, page: int = 0) -> List[str]:
        """Compile (or otherwise ready) at load what ``attend`` will need for calls of up to
        ``max_batch`` sequences, ``capacity`` cache slots, these query counts per sequence and
        this lengths dtype / page size, so the first such decode step does not stall. Returns
        what it readied (for logs); the default has nothing to ready."""
        return []

    def attend(self, prep: dict, q_nope: Tensor, q_rope: Tensor, cache: dict, lengths: Tensor,
               cfg: GQLAConfig) -> Tensor:
        """S new query tokens per sequence at positions lengths[b] + s (s = 0..S-1), their K/V
        already in the cache; query s sees keys 0..lengths[b] + s (causal among the new tokens).
        q_nope (B, S, H, d_n), q_rope (B, S, H, d_r). Returns o (B, S, H, d_v)."""
        raise NotImplementedError


def visible(lengths: Tensor, S: int, T: int) -> Tensor:
    """(B, S, T) mask: query s of sequence b sees cache slots t <= lengths[b] + s."""
    last = lengths[:, None] + torch.arange(S, device=lengths.device)[None, :]
    return torch.arange(T, device=lengths.device)[None, None, :] <= last[:, :, None]


class TorchAbsorb(DecodeBackend):
    name, path = "torch_absorb", "absorb"

    def attend(self, prep, q_nope, q_rope, cache, lengths, cfg):
        B, S, H, _ = q_nope.shape
        G, M = cfg.num_query_groups, cfg.heads_per_group
        q_abs = ref.absorb_query(q_nope, prep["W_UK"])
        scores = (torch.einsum("bsgmc,btc->bgmst", q_abs, cache["c"])
                  + torch.einsum("bsgmr,btr->bgmst", q_rope.view(B, S, G, M, -1), cache["k_rope"]))
        scores = scores * cfg.softmax_scale
        scores = scores.masked_fill(~visible(lengths, S, cache["c"].shape[1])[:, None, None], float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(q_nope.dtype)
        o_lat = torch.einsum("bgmst,btc->bsgmc", p, cache["c"])
        return ref.absorb_output(o_lat, prep["W_UV"])


class TorchGQA(DecodeBackend):
    name, path = "torch_gqa", "gqa"

    def attend(self, prep, q_nope, q_rope, cache, lengths, cfg):
        B, S, H, _ = q_nope.shape
        G, M = cfg.num_query_groups, cfg.heads_per_group
        scores = (torch.einsum("bsgmn,btgn->bgmst", q_nope.view(B, S, G, M, -1), cache["k_nope"])
                  + torch.einsum("bsgmr,btr->bgmst", q_rope.view(B, S, G, M, -1), cache["k_rope"]))
        scores = scores * cfg.softmax_scale
        scores = scores.masked_fill(~visible(lengths, S, cache["v"].shape[1])[:, None, None], float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(q_nope.dtype)
        return torch.einsum("bgmst,btgv->bsgmv", p, cache["v"]).reshape(B, S, H, -1)


# kernel backends first; they import triton / tilelang lazily (missing ones are rejection reasons)
from gqla_megatron.inference.triton_backends import backend_classes  # noqa: E402

TileLangAbsorb, TritonAbsorb, TritonGQA = backend_classes(DecodeBackend)

REGISTRY: Dict[str, type] = {b.name: b for b in (TileLangAbsorb, TritonAbsorb, TritonGQA, TorchAbsorb, TorchGQA)}
PRIORITY = {"absorb": ["tilelang_absorb", "triton_absorb", "torch_absorb"], "gqa": ["triton_gqa", "torch_gqa"]}


@dataclass
class BackendChoice:
    backend: DecodeBackend
    rejected: Dict[str, List[str]]


def select_backend(path: str, cfg: GQLAConfig, device: torch.device, dtype: torch.dtype,
                   requested: str = "auto") -> BackendChoice:
    """The first supported backend for ``path`` (or the requested one), with the reasons every
    other candidate was rejected. Raises ValueError listing all reasons if none can run."""
    if path not in PRIORITY:
        raise ValueError(f"decode path must be one of {sorted(PRIORITY)}, got {path!r}")
    if requested != "auto":
        if requested not in REGISTRY:
            raise ValueError(f"unknown decode backend {requested!r}; known: {sorted(REGISTRY)}")
        cls = REGISTRY[requested]
        problems = ([f"{requested} serves the {cls.path} path, not {path}"] if cls.path != path else [])
        problems += cls.supported(cfg, device, dtype)
        if problems:
            raise ValueError(f"decode backend {requested!r} cannot run: " + "; ".join(problems))
        return BackendChoice(cls(), {})
    rejected = {}
    for name in PRIORITY[path]:
        problems = REGISTRY[name].supported(cfg, device, dtype)
        if not problems:
            return BackendChoice(REGISTRY[name](), rejected)
        rejected[name] = problems
    raise ValueError(f"no decode backend can run the {path} path: {rejected}")
