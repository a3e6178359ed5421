"""A tiny plain-PyTorch GPT with GQLA attention: the reference for end-to-end parity.

Same architecture as Megatron-Core's ``GPTModel`` built by ``build_gqla_gpt_model``:
pre-norm layers (RMSNorm -> GQLA attention -> residual -> RMSNorm -> SwiGLU MLP -> residual),
final RMSNorm, LM head. SwiGLU follows Megatron: ``linear_fc1`` rows are [gate ; up] and the
activation is silu(gate) * up. Attention is ``gqla_megatron.reference``; decode runs on either
path with one cache per layer.

Multi-token prediction (Megatron-Core 0.16.1's ``MultiTokenPredictionLayer``, DeepSeek-V3):
MTP depth k (k = 1..D) at position i takes h^{k-1}_i, the main model's hidden AFTER its final
RMSNorm for k = 1 (Megatron applies ``decoder.final_layernorm`` before the MTP block), else
depth k-1's output, and the embedding of token t_{i+k}:

    x_i   = eh_proj [ enorm(emb(t_{i+k})) ; hnorm(h^{k-1}_i) ]     (embedding FIRST in the concat)
    h^k_i = final_layernorm_k( TransformerLayer_k(x)_i )            (GQLA layer at RoPE position i)
    logits^k_i = output(h^k_i), predicting t_{i+k+1}

with the shared embedding and output head. In training the shifted tokens come from rolling the
input ids left (the last k positions get token 0, and their labels are masked out).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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


def _layer_to(l: LayerWeights, *args, **kwargs) -> LayerWeights:
    return LayerWeights(l.input_norm.to(*args, **kwargs), l.attn.to(*args, **kwargs),
                        l.mlp_norm.to(*args, **kwargs), l.W_fc1.to(*args, **kwargs),
                        l.W_fc2.to(*args, **kwargs))


@dataclass
class MTPWeights:
    """One multi-token-prediction depth (Megatron ``mtp.layers.<k-1>``)."""
    enorm: Tensor        # (D,) RMSNorm of the shifted token's embedding
    hnorm: Tensor        # (D,) RMSNorm of the incoming hidden state
    eh_proj: Tensor      # (D, 2D): input columns [embedding ; hidden]
    layer: LayerWeights  # a full GQLA transformer layer
    final_norm: Tensor   # (D,) applied before the shared output head

    def to(self, *args, **kwargs) -> "MTPWeights":
        return MTPWeights(self.enorm.to(*args, **kwargs), self.hnorm.to(*args, **kwargs),
                          self.eh_proj.to(*args, **kwargs), _layer_to(self.layer, *args, **kwargs),
                          self.final_norm.to(*args, **kwargs))


@dataclass
class ModelWeights:
    embedding: Tensor    # (vocab, D)
    layers: List[LayerWeights]
    final_norm: Tensor   # (D,)
    output: Tensor       # (vocab, D)
    eps: float = 1e-5
    mtp: List[MTPWeights] = field(default_factory=list)  # MTP depths 1..D (empty: none)

    def to(self, *args, **kwargs) -> "ModelWeights":
        layers = [_layer_to(l, *args, **kwargs) for l in self.layers]
        return replace(self, embedding=self.embedding.to(*args, **kwargs), layers=layers,
                       final_norm=self.final_norm.to(*args, **kwargs),
                       output=self.output.to(*args, **kwargs),
                       mtp=[m.to(*args, **kwargs) for m in self.mtp])


def mlp(h: Tensor, lw: LayerWeights, eps: float) -> Tensor:
    """SwiGLU MLP of one layer (pre-norm inside), Megatron's fc1 layout [gate ; up]."""
    return mlp_from_normed(ref.rms_norm(h, lw.mlp_norm, eps), lw)


def mlp_from_normed(x: Tensor, lw: LayerWeights) -> Tensor:
    """``mlp`` after its pre-norm: silu(gate) * up, then the down-projection."""
    gate, up = (x @ lw.W_fc1.T).chunk(2, dim=-1)
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


# ---- multi-token prediction ------------------------------------------------------------
def layer_forward(h: Tensor, lw: LayerWeights, cfg: GQLAConfig, eps: float, start_pos=0) -> Tensor:
    """One pre-norm transformer layer over a full causal sequence (expanded attention)."""
    h = h + ref.attention_expanded(ref.rms_norm(h, lw.input_norm, eps), lw.attn, cfg, start_pos)
    return h + mlp(h, lw, eps)


def hidden(tokens_BS: Tensor, mw: ModelWeights, cfg: GQLAConfig) -> Tensor:
    """The main model's last hidden state AFTER the final RMSNorm (B, S, D): the LM head's input
    and MTP depth 1's hidden input."""
    h = mw.embedding[tokens_BS]
    for lw in mw.layers:
        h = layer_forward(h, lw, cfg, mw.eps)
    return ref.rms_norm(h, mw.final_norm, mw.eps)


def mtp_input(h_prev: Tensor, next_tokens: Tensor, m: MTPWeights, mw: ModelWeights) -> Tensor:
    """eh_proj [enorm(emb(next_tokens)) ; hnorm(h_prev)] (the layer input of one MTP depth)."""
    e = ref.rms_norm(mw.embedding[next_tokens], m.enorm, mw.eps)
    return torch.cat([e, ref.rms_norm(h_prev, m.hnorm, mw.eps)], -1) @ m.eh_proj.T


def roll_left(t: Tensor, k: int) -> Tensor:
    """Shift a (B, S) tensor k places left along S, zero-filling the last k (Megatron's
    ``roll_tensor`` applied k times)."""
    out = torch.zeros_like(t)
    if k < t.shape[-1]:
        out[..., :t.shape[-1] - k] = t[..., k:]
    return out


def mtp_forward(tokens_BS: Tensor, mw: ModelWeights, cfg: GQLAConfig) -> tuple[Tensor, List[Tensor]]:
    """Full causal forward with every MTP depth, as in training: (main logits (B, S, vocab),
    [logits of depth k (B, S, vocab) for k = 1..D]); depth k at position i predicts t_{i+k+1}.
    The shifted tokens are the input rolled left with zero fill (positions past the end see
    token 0, as in Megatron)."""
    h = hidden(tokens_BS, mw, cfg)
    main = h @ mw.output.T
    out = []
    for k, m in enumerate(mw.mtp, start=1):
        x = mtp_input(h, roll_left(tokens_BS, k), m, mw)
        h = ref.rms_norm(layer_forward(x, m.layer, cfg, mw.eps), m.final_norm, mw.eps)
        out.append(h @ mw.output.T)
    return main, out


def mtp_losses(tokens_BS: Tensor, labels_BS: Tensor, mw: ModelWeights, cfg: GQLAConfig,
               loss_mask_BS: Optional[Tensor] = None) -> List[Tensor]:
    """Per-depth MTP loss as Megatron logs it: depth k's labels and loss mask are the main ones
    rolled k places left (zero fill); loss_k = sum(CE * mask) / sum(mask)."""
    _, logits = mtp_forward(tokens_BS, mw, cfg)
    mask = torch.ones_like(labels_BS) if loss_mask_BS is None else loss_mask_BS
    out = []
    for k, lg in enumerate(logits, start=1):
        lab, msk = roll_left(labels_BS, k), roll_left(mask, k)
        ce = torch.nn.functional.cross_entropy(lg.flatten(0, 1).float(), lab.flatten(), reduction="none")
        out.append((ce * msk.flatten()).sum() / msk.sum())
    return out
