"""A tiny plain-PyTorch GPT with GQLA attention: the reference for end-to-end parity.

Same architecture as Megatron-Core's ``GPTModel`` built by ``build_gqla_gpt_model``:
pre-norm layers (RMSNorm -> GQLA attention -> residual -> RMSNorm -> SwiGLU MLP -> residual),
final RMSNorm, LM head. SwiGLU follows Megatron: ``linear_fc1`` rows are [gate ; up] and the
activation is silu(gate) * up. Attention is ``gqla_megatron.reference``; decode runs on either
path with one cache per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional

import torch
from torch import Tensor

from gqla_megatron import reference as ref
from gqla_megatron.config import GQLAConfig


@dataclass
class LayerWeights:
    input_norm: Tensor   # (D,)
    attn: ref.GQLAWeights
    mlp_norm: Tensor     # (D,)
    W_fc1: Tensor        # (2F, D): [gate ; up]
    W_fc2: Tensor        # (D, F)


@dataclass
class ModelWeights:
    embedding: Tensor    # (vocab, D)
    layers: List[LayerWeights]
    final_norm: Tensor   # (D,)
    output: Tensor       # (vocab, D)
    eps: float = 1e-5

    def to(self, *args, **kwargs) -> "ModelWeights":
        layers = [LayerWeights(l.input_norm.to(*args, **kwargs), l.attn.to(*args, **kwargs),
                               l.mlp_norm.to(*args, **kwargs), l.W_fc1.to(*args, **kwargs),
                               l.W_fc2.to(*args, **kwargs)) for l in self.layers]
        return replace(self, embedding=self.embedding.to(*args, **kwargs), layers=layers,
                       final_norm=self.final_norm.to(*args, **kwargs),
                       output=self.output.to(*args, **kwargs))


def mlp(h: Tensor, lw: LayerWeights, eps: float) -> Tensor:
    """SwiGLU MLP of one layer (pre-norm inside), Megatron's fc1 layout [gate ; up]."""
    gate, up = (ref.rms_norm(h, lw.mlp_norm, eps) @ lw.W_fc1.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ lw.W_fc2.T


def forward(tokens_BS: Tensor, mw: ModelWeights, cfg: GQLAConfig) -> Tensor:
    """Full causal forward (expanded attention); logits (B, S, vocab)."""
    h = mw.embedding[tokens_BS]
    for lw in mw.layers:
        h = h + ref.attention_expanded(ref.rms_norm(h, lw.input_norm, mw.eps), lw.attn, cfg)
        h = h + mlp(h, lw, mw.eps)
    return ref.rms_norm(h, mw.final_norm, mw.eps) @ mw.output.T


def empty_caches(path: str, cfg: GQLAConfig, mw: ModelWeights, batch: int) -> list:
    if path not in ("absorb", "gqa"):
        raise ValueError(f"decode path must be 'absorb' or 'gqa', got {path!r}")
    make = ref.empty_latent_cache if path == "absorb" else ref.empty_group_cache
    return [make(cfg, batch, dtype=mw.embedding.dtype, device=mw.embedding.device) for _ in mw.layers]


def decode(tokens_BS: Tensor, mw: ModelWeights, cfg: GQLAConfig, caches: list,
           path: Optional[str] = None) -> tuple[Tensor, list]:
    """Run S new tokens against ``caches`` (one per layer) on the path the caches belong to.
    Returns logits (B, S, vocab) and the new caches."""
    h = mw.embedding[tokens_BS]
    new = []
    for lw, cache in zip(mw.layers, caches):
        step = ref.decode_absorb if isinstance(cache, ref.LatentCache) else ref.decode_gqa
        y, c = step(ref.rms_norm(h, lw.input_norm, mw.eps), cache, lw.attn, cfg)
        new.append(c)
        h = h + y
        h = h + mlp(h, lw, mw.eps)
    return ref.rms_norm(h, mw.final_norm, mw.eps) @ mw.output.T, new


def cache_bytes_per_token(path: str, cfg: GQLAConfig, num_layers: int, dtype_bytes: int = 2) -> int:
    """KV-cache bytes per token over all layers (RoPE key stored once on the GQA path)."""
    per_layer = (cfg.absorb_cache_elems_per_token if path == "absorb"
                 else cfg.gqa_cache_elems_per_token())
    return per_layer * num_layers * dtype_bytes
