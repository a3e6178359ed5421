"""The one name table between Megatron-Core GQLA parameters and the reference's math names.

Both the parity tests and the checkpoint converters go through this module. Tensors here are
full (unsharded) tensors, i.e. a TP=1 state dict or merged shards.

Megatron keys are relative to ``decoder.layers.<i>.`` (or an MTP layer's
``transformer_layer.``); the local and TE specs name the latent norms differently because TE
fuses them into the following linear.
"""

from __future__ import annotations

from typing import Mapping

import torch

from gqla_megatron.config import GQLAConfig
from gqla_megatron.reference import GQLAWeights
from gqla_megatron.reference_model import LayerWeights, ModelWeights, MTPWeights

# math name -> (local spec key, TE spec key), relative to the transformer layer.
# W_DKV and W_KR are the two row blocks [:r] and [r:] of one Megatron weight.
LAYER_PARAM_NAMES = {
    "input_norm": ("input_layernorm.weight", "input_layernorm.weight"),
    "W_DQ": ("self_attention.linear_q_down_proj.weight", "self_attention.linear_q_down_proj.weight"),
    "q_norm": ("self_attention.q_layernorm.weight", "self_attention.linear_q_up_proj.layer_norm_weight"),
    "W_UQ": ("self_attention.linear_q_up_proj.weight", "self_attention.linear_q_up_proj.weight"),
    "W_Q": ("self_attention.linear_q_proj.weight", "self_attention.linear_q_proj.weight"),
    "W_DKV|W_KR": ("self_attention.linear_kv_down_proj.weight", "self_attention.linear_kv_down_proj.weight"),
    "kv_norm": ("self_attention.kv_layernorm.weight", "self_attention.linear_kv_up_proj.layer_norm_weight"),
    "W_UKV": ("self_attention.linear_kv_up_proj.weight", "self_attention.linear_kv_up_proj.weight"),
    "W_O": ("self_attention.linear_proj.weight", "self_attention.linear_proj.weight"),
    "mlp_norm": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    "W_fc1": ("mlp.linear_fc1.weight", "mlp.linear_fc1.weight"),
    "W_fc2": ("mlp.linear_fc2.weight", "mlp.linear_fc2.weight"),
}
MODEL_PARAM_NAMES = {
    "embedding": "embedding.word_embeddings.weight",
    "final_norm": "decoder.final_layernorm.weight",
    "output": "output_layer.weight",
}
# MTP depth k (Megatron ``mtp.layers.<k-1>.``): math name -> key relative to that prefix; the
# transformer layer inside goes through LAYER_PARAM_NAMES under ``transformer_layer.``.
MTP_PARAM_NAMES = {
    "enorm": "enorm.weight",
    "hnorm": "hnorm.weight",
    "eh_proj": "eh_proj.weight",
    "final_norm": "final_layernorm.weight",
}
MTP_LAYER_PREFIX = "transformer_layer."
_BACKEND_COLUMN = {"local": 0, "te": 1}


def _key(name: str, backend: str) -> str:
    if backend not in _BACKEND_COLUMN:
        raise ValueError(f"backend must be one of {sorted(_BACKEND_COLUMN)}, got {backend!r}")
    return LAYER_PARAM_NAMES[name][_BACKEND_COLUMN[backend]]


def layer_keys(cfg: GQLAConfig, backend: str = "local") -> dict:
    """math name -> Megatron key for the tensors a layer of ``cfg`` actually has."""
    names = ["input_norm", "W_DKV|W_KR", "W_UKV", "W_O", "mlp_norm", "W_fc1", "W_fc2"]
    names += ["W_DQ", "W_UQ"] if cfg.q_lora_rank is not None else ["W_Q"]
    if cfg.qk_layernorm:
        names += ["kv_norm"] + (["q_norm"] if cfg.q_lora_rank is not None else [])
    return {n: _key(n, backend) for n in names}


def layer_to_reference(sd: Mapping[str, torch.Tensor], prefix: str, cfg: GQLAConfig,
                       backend: str = "local") -> LayerWeights:
    """Read one transformer layer (keys ``prefix + key``) into reference weights."""
    keys = layer_keys(cfg, backend)
    missing = [prefix + k for k in keys.values() if prefix + k not in sd]
    if missing:
        raise KeyError(f"missing Megatron keys: {missing}")
    t = {n: sd[prefix + k] for n, k in keys.items()}
    C = cfg.kv_lora_rank
    attn = GQLAWeights(
        W_UQ=t["W_UQ"] if cfg.q_lora_rank is not None else t["W_Q"],
        W_DQ=t.get("W_DQ"), q_norm=t.get("q_norm"),
        W_DKV=t["W_DKV|W_KR"][:C], W_KR=t["W_DKV|W_KR"][C:], kv_norm=t.get("kv_norm"),
        W_UKV=t["W_UKV"], W_O=t["W_O"])
    attn.check(cfg)
    return LayerWeights(input_norm=t["input_norm"], attn=attn, mlp_norm=t["mlp_norm"],
                        W_fc1=t["W_fc1"], W_fc2=t["W_fc2"])


def layer_from_reference(lw: LayerWeights, prefix: str, cfg: GQLAConfig,
                         backend: str = "local") -> dict:
    """Inverse of ``layer_to_reference``: a dict of Megatron keys -> full tensors."""
    a = lw.attn
    vals = {"input_norm": lw.input_norm, "W_DKV|W_KR": torch.cat([a.W_DKV, a.W_KR], 0),
            "W_UKV": a.W_UKV, "W_O": a.W_O, "mlp_norm": lw.mlp_norm, "W_fc1": lw.W_fc1,
            "W_fc2": lw.W_fc2, "W_DQ": a.W_DQ, "W_UQ": a.W_UQ, "W_Q": a.W_UQ,
            "q_norm": a.q_norm, "kv_norm": a.kv_norm}
    return {prefix + k: vals[n] for n, k in layer_keys(cfg, backend).items()}


def mtp_to_reference(sd: Mapping[str, torch.Tensor], depth: int, cfg: GQLAConfig,
                     backend: str = "local") -> MTPWeights:
    """MTP depth ``depth`` (1-based; keys ``mtp.layers.<depth-1>.*``) -> reference weights."""
    prefix = f"mtp.layers.{depth - 1}."
    missing = [prefix + k for k in MTP_PARAM_NAMES.values() if prefix + k not in sd]
    if missing:
        raise KeyError(f"missing Megatron keys: {missing}")
    t = {n: sd[prefix + k] for n, k in MTP_PARAM_NAMES.items()}
    return MTPWeights(enorm=t["enorm"], hnorm=t["hnorm"], eh_proj=t["eh_proj"],
                      layer=layer_to_reference(sd, prefix + MTP_LAYER_PREFIX, cfg, backend),
                      final_norm=t["final_norm"])


def mtp_from_reference(m: MTPWeights, depth: int, cfg: GQLAConfig, backend: str = "local") -> dict:
    """Inverse of ``mtp_to_reference``."""
    prefix = f"mtp.layers.{depth - 1}."
    out = {prefix + k: getattr(m, n) for n, k in MTP_PARAM_NAMES.items()}
    out.update(layer_from_reference(m.layer, prefix + MTP_LAYER_PREFIX, cfg, backend))
    return out


def num_mtp_layers(sd: Mapping[str, torch.Tensor]) -> int:
    """How many MTP depths a Megatron state dict holds (0 if none)."""
    depths = {int(k.split(".")[2]) for k in sd if k.startswith("mtp.layers.") and k.split(".")[2].isdigit()}
    return max(depths) + 1 if depths else 0


def model_to_reference(sd: Mapping[str, torch.Tensor], cfg: GQLAConfig, num_layers: int,
                       *, backend: str = "local", eps: float = 1e-5,
                       mtp_num_layers: int = 0) -> ModelWeights:
    """A full GPTModel state dict (TP=1 or merged) -> reference model weights, with the first
    ``mtp_num_layers`` MTP depths (``mtp.layers.*``)."""
    emb = sd[MODEL_PARAM_NAMES["embedding"]]
    out = sd.get(MODEL_PARAM_NAMES["output"], emb)  # tied when there is no output_layer
    layers = [layer_to_reference(sd, f"decoder.layers.{i}.", cfg, backend) for i in range(num_layers)]
    biases = [k for k in sd if k.endswith(".bias") and "_extra_state" not in k]
    if biases:
        raise ValueError(f"the reference model has no linear biases; found {biases[:3]} "
                         f"(build with add_bias_linear=False)")
    mtp = [mtp_to_reference(sd, k, cfg, backend) for k in range(1, mtp_num_layers + 1)]
    return ModelWeights(embedding=emb, layers=layers, final_norm=sd[MODEL_PARAM_NAMES["final_norm"]],
                        output=out, eps=eps, mtp=mtp)
