r"""Hugging Face safetensors checkpoints: import GQA models, export and re-import GQLA models.

Three top-level functions (each validates its input before doing any work):

``load_hf_gqa(model_dir) -> (GQAModelWeights, GQAModelConfig, tokenizer_path or None)``
    A LLaMA / Mistral / Qwen2 checkpoint (``config.json`` + ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``), read lazily with ``safetensors.safe_open`` and cast to
    float32. HF stores Q/K rows in the half-split RoPE layout, which is what ``gqa_forward`` and
    the TransGQLA converter expect, so no row permutation is applied. Every tensor of the
    checkpoint must be used exactly once (a leftover, missing or mis-shaped tensor is a
    ValueError naming it). Tied embeddings (``tie_word_embeddings``, no ``lm_head.weight``) give
    ``output is embedding``. Rejected with a ValueError naming the field: another
    ``model_type``, RoPE scaling (``rope_scaling`` / a non-default ``rope_parameters.rope_type``),
    partial rotary, a non-SiLU MLP, MLP biases, and non-zero q/k/v/o biases. Qwen2 always
    stores q/k/v biases: all-zero ones are accepted (dropped), non-zero ones are NOT supported
    because ``GQALayerWeights`` has no bias fields (and RMSNorm outputs have no constant
    coordinate to fold a bias into). A Mistral/Qwen2 ``sliding_window`` is accepted with a
    warning: ``gqa_forward`` attends to the full causal context, which equals the checkpoint's
    attention only for sequences no longer than the window.

``save_hf_gqla(model_dir, mw, cfg, *, layout="gqla" | "deepseek_v3", ...)``
    GQLA reference weights (``reference_model.ModelWeights`` + ``GQLAConfig``) as HF
    safetensors, written to a temporary sibling directory and renamed; an existing output path is
    refused. Optional ``tokenizer_path`` (a tokenizer.json) is copied, with a sibling
    ``tokenizer_config.json`` if there is one.

    layout "gqla": this project's own config (``model_type "gqla"``, ``architectures
    ["GQLAForCausalLM"]``, ``num_key_value_heads = g``) and DeepSeek-style tensor names::

        model.embed_tokens.weight                       (vocab, D)
        model.layers.{i}.input_layernorm.weight         (D,)
        model.layers.{i}.self_attn.q_a_proj.weight      (r_q, D)       W_DQ   (q_lora_rank set)
        model.layers.{i}.self_attn.q_a_layernorm.weight (r_q,)         q_norm (and qk_layernorm)
        model.layers.{i}.self_attn.q_b_proj.weight      (H(N+R), r_q)  W_UQ   (q_lora_rank set)
        model.layers.{i}.self_attn.q_proj.weight        (H(N+R), D)    W_UQ   (q_lora_rank None)
        model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight (C+R, D)  [W_DKV ; W_KR]
        model.layers.{i}.self_attn.kv_a_layernorm.weight (C,)          kv_norm (qk_layernorm)
        model.layers.{i}.self_attn.kv_b_proj.weight     (G(N+V), C)    W_UKV, one [K;V] block per GROUP
        model.layers.{i}.self_attn.o_proj.weight        (D, H V)       W_O
        model.layers.{i}.post_attention_layernorm.weight (D,)
        model.layers.{i}.mlp.gate_proj.weight / up_proj.weight (F, D), down_proj.weight (D, F)
        model.norm.weight (D,), lm_head.weight (vocab, D) (absent when tied)

    RoPE rows are stored in the reference's interleaved pair order (``rope_interleave: true``).

    layout "deepseek_v3": the same names, loadable by ``transformers.DeepseekV3ForCausalLM`` and
    stock MLA servers. Differences: ``kv_b_proj`` has one block per HEAD (each group's block
    repeated h_q/g times, ``reference.mla_layout_up_proj``), ``num_key_value_heads = h_q``,
    every MLP dense (``first_k_dense_replace = num_layers``; the MoE fields, which transformers
    requires as integers, are set to 1 and unused), no MTP layers, no ``rope_scaling`` (so the softmax scale is (N+R)^-1/2 = GQLAConfig.softmax_scale,
    no YaRN mscale). ``rope_interleave=True`` (default) keeps the interleaved rows, which
    transformers' ``apply_rotary_pos_emb_interleave`` consumes as they are; with
    ``rope_interleave=False`` the RoPE rows of ``q_b_proj``/``q_proj`` and of
    ``kv_a_proj_with_mqa`` are permuted to the half-split (rotate_half) order, row 2k -> k and
    2k+1 -> k + R/2. DeepSeek always applies ``kv_a_layernorm`` (and ``q_a_layernorm`` with a q
    latent), so the layout needs ``qk_layernorm=True``; transformers builds those two norms with
    eps 1e-6 (vLLM uses ``rms_norm_eps``), so ``layernorm_epsilon`` must be 1e-6 unless
    ``allow_eps_mismatch=True`` (then the export is approximate in those norms).

``load_hf_gqla(model_dir) -> (ModelWeights, GQLAConfig, tokenizer_path or None)``
    Reads the "gqla" layout back (exact round trip; every tensor used once).

``load_hf_mla(model_dir) -> (ModelWeights, GQLAConfig, tokenizer_path or None)``
    Reads a DENSE DeepSeek-V3-layout directory (every layer dense: ``first_k_dense_replace >=
    num_hidden_layers``; no MoE, no MTP, no RoPE scaling, no biases) as an MLA model with
    ``num_query_groups = num_attention_heads`` (one up-projection block per head), RoPE rows
    brought back to the interleaved order if ``rope_interleave`` is false and latent-norm eps
    1e-6 (transformers' DeepSeek-V3): the source format of ``mla_to_gqla``. DeepSeek-V2/V3
    releases are MoE models and are rejected (``ModelWeights`` has dense SwiGLU MLPs only).

CLI wiring (``gqla-convert``, owned by cli.py)::

    import-hf  SRC_DIR ...   -> load_hf_gqa(SRC_DIR), then write a Megatron GQA checkpoint
    mla-to-gqla --hf-src DIR -> load_hf_mla(DIR) as the MLA source (see mla_to_gqla.py)
    export-hf  ... OUT_DIR --layout {gqla,deepseek_v3} [--rope-interleave/--no-rope-interleave]
               [--dtype fp32|bf16|fp16] [--tokenizer tokenizer.json]
                             -> save_hf_gqla(OUT_DIR, mw, cfg, layout=..., ...)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from gqla_megatron import reference as ref
from gqla_megatron import reference_model as rm
from gqla_megatron.config import GQLAConfig
from gqla_megatron.conversion.gguf_import import GQALayerWeights, GQAModelConfig, GQAModelWeights

__all__ = ["SUPPORTED_GQA_TYPES", "GQLA_LAYOUTS", "load_hf_gqa", "save_hf_gqla", "load_hf_gqla",
           "load_hf_mla",
           "deepseek_v3_config", "gqla_hf_config", "interleaved_to_half_split_rows"]

SUPPORTED_GQA_TYPES = ("llama", "mistral", "qwen2")
GQLA_LAYOUTS = ("gqla", "deepseek_v3")
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_DEEPSEEK_NORM_EPS = 1e-6          # DeepseekV3RMSNorm default, used for q_a / kv_a layernorms


# ----------------------------------------------------------------------------------------
# reading safetensors lazily
# ----------------------------------------------------------------------------------------
class _LazyTensors:
    """Tensors of a (possibly sharded) safetensors checkpoint, opened with ``safe_open`` and
    read one at a time. ``take`` hands each tensor out once (shape checked, cast to ``dtype``);
    ``finish`` rejects tensors nobody took."""

    def __init__(self, model_dir: str, dtype: Optional[torch.dtype]):
        from safetensors import safe_open

        single, index = os.path.join(model_dir, _SINGLE), os.path.join(model_dir, _INDEX)
        self._where: Dict[str, str] = {}
        if os.path.isfile(index):
            with open(index) as fh:
                try:
                    wmap = json.load(fh)["weight_map"]
                except (ValueError, KeyError) as e:
                    raise ValueError(f"{index}: not a safetensors index (no 'weight_map'): {e}") from e
            for name, shard in wmap.items():
                path = os.path.join(model_dir, shard)
                if not os.path.isfile(path):
                    raise ValueError(f"{index}: shard {shard!r} (of tensor {name!r}) is missing")
                self._where[name] = path
        elif os.path.isfile(single):
            self._where = {}
        else:
            raise ValueError(f"{model_dir}: neither {_SINGLE} nor {_INDEX} found")
        self._handles = {}
        paths = sorted(set(self._where.values())) if self._where else [single]
        for p in paths:
            try:
                h = safe_open(p, framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"cannot open safetensors file {p}: {e}") from e
            self._handles[p] = h
            if not os.path.isfile(index):
                self._where.update({k: p for k in h.keys()})
        for name, p in self._where.items():
            if name not in self._handles[p].keys():
                raise ValueError(f"{index}: tensor {name!r} is not in its shard {os.path.basename(p)}")
        self._left = set(self._where)
        self._dtype = dtype

    def has(self, name: str) -> bool:
        return name in self._left

    def names(self) -> List[str]:
        return sorted(self._left)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def take(self, name: str, shape: Tuple[int, ...]) -> Tensor:
        if name not in self._where:
            raise ValueError(f"safetensors tensor {name!r} is missing")
        if name not in self._left:
            raise ValueError(f"safetensors tensor {name!r} requested twice")
        got = self.shape(name)
        if got != tuple(shape):
            raise ValueError(f"safetensors tensor {name!r} has shape {got}, expected {tuple(shape)}")
        self._left.discard(name)
        t = self._handles[self._where[name]].get_tensor(name)
        return t if self._dtype is None else t.to(self._dtype)

    def drop(self, name: str) -> None:
        """Mark a tensor as used without reading it (e.g. a redundant tied lm_head)."""
        self._left.discard(name)

    def finish(self, what: str) -> None:
        if self._left:
            raise ValueError(f"safetensors tensors not used by the {what} import: {sorted(self._left)}")


def _read_config(model_dir: str) -> dict:
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir!r} does not exist")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir}: config.json is missing")
    with open(path) as fh:
        try:
            return json.load(fh)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


def _cfg_int(c: dict, key: str, default=None) -> int:
    v = c.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"config.json field {key!r} must be a positive integer, got {v!r}")
    return v


def _cfg_float(c: dict, key: str, v=None) -> float:
    v = c.get(key) if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"config.json field {key!r} must be a positive number, got {v!r}")
    return float(v)


def _rope_theta(c: dict) -> float:
    """RoPE base from ``rope_theta`` (transformers 4) or ``rope_parameters`` (transformers 5);
    any scaling is rejected."""
    rs = c.get("rope_scaling")
    if rs not in (None, {}) and not (isinstance(rs, dict)
                                      and rs.get("rope_type", rs.get("type")) == "default"):
        raise ValueError(f"config.json field 'rope_scaling' is {rs!r}: RoPE scaling is not supported")
    rp = c.get("rope_parameters")
    theta = c.get("rope_theta")
    if rp is not None:
        if not isinstance(rp, dict):
            raise ValueError(f"config.json field 'rope_parameters' must be an object, got {rp!r}")
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype != "default":
            raise ValueError(f"config.json field 'rope_parameters.rope_type' is {rtype!r}: RoPE "
                             f"scaling is not supported")
        prf = rp.get("partial_rotary_factor", 1.0)
        if prf != 1.0:
            raise ValueError(f"config.json field 'rope_parameters.partial_rotary_factor' is {prf!r}: "
                             f"partial rotary is not supported")
        theta = rp.get("rope_theta", theta)
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json field 'partial_rotary_factor' is "
                         f"{c['partial_rotary_factor']!r}: partial rotary is not supported")
    if theta is None:
        raise ValueError("config.json gives no RoPE base ('rope_theta' or 'rope_parameters.rope_theta')")
    return _cfg_float(c, "rope_theta", theta)


def _tokenizer_in(model_dir: str) -> Optional[str]:
    p = os.path.join(model_dir, "tokenizer.json")
    return p if os.path.isfile(p) else None


# ----------------------------------------------------------------------------------------
# 1. HF GQA import
# ----------------------------------------------------------------------------------------
def _gqa_config_from_hf(c: dict) -> GQAModelConfig:
    mt = c.get("model_type")
    if mt not in SUPPORTED_GQA_TYPES:
        raise ValueError(f"config.json field 'model_type' is {mt!r}; supported: "
                         f"{', '.join(SUPPORTED_GQA_TYPES)}")
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json field 'hidden_act' is {act!r}: only SiLU (SwiGLU) MLPs are supported")
    if c.get("mlp_bias", False):
        raise ValueError("config.json field 'mlp_bias' is true: MLP biases are not supported")
    D = _cfg_int(c, "hidden_size")
    H = _cfg_int(c, "num_attention_heads")
    g = _cfg_int(c, "num_key_value_heads", H) if c.get("num_key_value_heads") is not None else H
    hd = c.get("head_dim")
    if hd is None:
        if D % H:
            raise ValueError(f"config.json: hidden_size ({D}) is not a multiple of "
                             f"num_attention_heads ({H}) and head_dim is not given")
        hd = D // H
    d = _cfg_int({"head_dim": hd}, "head_dim")
    sw = c.get("sliding_window")
    if sw is not None and (mt == "mistral" or c.get("use_sliding_window", False)):
        warnings.warn(f"config.json sets sliding_window={sw}: gqa_forward attends to the full "
                      f"causal context, identical to the checkpoint only for sequences of at most "
                      f"{sw} tokens", stacklevel=3)
    try:
        return GQAModelConfig(
            hidden_size=D, num_layers=_cfg_int(c, "num_hidden_layers"), num_attention_heads=H,
            num_kv_heads=g, head_dim=d, ffn_hidden_size=_cfg_int(c, "intermediate_size"),
            vocab_size=_cfg_int(c, "vocab_size"), rope_base=_rope_theta(c),
            eps=_cfg_float(c, "rms_norm_eps"),
            context_length=c.get("max_position_embeddings"))
    except ValueError as e:
        raise ValueError(f"config.json does not describe a valid GQA model: {e}") from e


def _take_zero_bias(st: _LazyTensors, name: str, n: int, model_type: str) -> None:
    if not st.has(name):
        return
    b = st.take(name, (n,))
    if b.abs().max().item() != 0.0:
        raise ValueError(f"safetensors tensor {name!r} is a non-zero bias: {model_type} attention "
                         f"biases are not supported (GQALayerWeights has no bias fields)")


def load_hf_gqa(model_dir: str, *, dtype: torch.dtype = torch.float32
                ) -> Tuple[GQAModelWeights, GQAModelConfig, Optional[str]]:
    """Import a HF LLaMA / Mistral / Qwen2 checkpoint directory (see module doc).

    Returns (weights in half-split RoPE layout, config, path of tokenizer.json or None).
    Tensors are read lazily (``safe_open``) and cast to ``dtype``."""
    c = _read_config(model_dir)
    cfg = _gqa_config_from_hf(c)
    st = _LazyTensors(model_dir, dtype)
    D, H, g, d, F, Vs = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.ffn_hidden_size, cfg.vocab_size)
    mt = c["model_type"]
    emb = st.take("model.embed_tokens.weight", (Vs, D))
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        W_Q = st.take(a + "q_proj.weight", (H * d, D))
        W_K = st.take(a + "k_proj.weight", (g * d, D))
        W_V = st.take(a + "v_proj.weight", (g * d, D))
        W_O = st.take(a + "o_proj.weight", (D, H * d))
        for nm, n in (("q_proj", H * d), ("k_proj", g * d), ("v_proj", g * d), ("o_proj", D)):
            _take_zero_bias(st, a + nm + ".bias", n, mt)
        gate = st.take(p + "mlp.gate_proj.weight", (F, D))
        up = st.take(p + "mlp.up_proj.weight", (F, D))
        layers.append(GQALayerWeights(
            attn_norm=st.take(p + "input_layernorm.weight", (D,)), W_Q=W_Q, W_K=W_K, W_V=W_V,
            W_O=W_O, mlp_norm=st.take(p + "post_attention_layernorm.weight", (D,)),
            W_fc1=torch.cat([gate, up], 0), W_fc2=st.take(p + "mlp.down_proj.weight", (D, F))))
    final_norm = st.take("model.norm.weight", (D,))
    tied = bool(c.get("tie_word_embeddings", False))
    if tied:
        if st.has("lm_head.weight"):
            head = st.take("lm_head.weight", (Vs, D))
            if not torch.equal(head, emb):
                raise ValueError("config.json sets tie_word_embeddings but lm_head.weight differs "
                                 "from model.embed_tokens.weight")
        output = emb
    else:
        if not st.has("lm_head.weight"):
            raise ValueError("safetensors tensor 'lm_head.weight' is missing (config.json: "
                             "tie_word_embeddings is false)")
        output = st.take("lm_head.weight", (Vs, D))
    st.finish(mt)
    w = GQAModelWeights(embedding=emb, layers=layers, final_norm=final_norm, output=output,
                        tied_output=tied, rope_layout="half_split")
    return w, cfg, _tokenizer_in(model_dir)


# ----------------------------------------------------------------------------------------
# 2. GQLA export (atomic)
# ----------------------------------------------------------------------------------------
def interleaved_to_half_split_rows(R: int) -> Tensor:
    """Row order (length R) taking interleaved RoPE rows (pair k = rows 2k, 2k+1) to the
    half-split order (pair k = rows k, k + R/2): new row j = old row perm[j]."""
    return torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])


def _is_tied(mw: rm.ModelWeights) -> bool:
    return mw.output is mw.embedding or (
        mw.output.shape == mw.embedding.shape and mw.output.data_ptr() == mw.embedding.data_ptr()
        and mw.output.stride() == mw.embedding.stride())


def _latent_config_fields(mw: rm.ModelWeights, cfg: GQLAConfig, *, kv_heads: int, torch_dtype: str) -> dict:
    """config.json fields both layouts share (DeepSeek-V3 names); ``kv_heads``: the K/V
    up-projection blocks stored (g for gqla, h_q for deepseek_v3)."""
    return {
        "vocab_size": int(mw.embedding.shape[0]), "hidden_size": cfg.hidden_size,
        "intermediate_size": int(mw.layers[0].W_fc2.shape[1]),
        "num_hidden_layers": len(mw.layers), "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": kv_heads, "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank, "qk_nope_head_dim": cfg.qk_head_dim,
        "qk_rope_head_dim": cfg.qk_pos_emb_head_dim, "v_head_dim": cfg.v_head_dim,
        "rope_theta": cfg.rotary_base, "rope_scaling": None, "rms_norm_eps": mw.eps,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": _is_tied(mw),
        "torch_dtype": torch_dtype,
    }


def gqla_hf_config(mw: rm.ModelWeights, cfg: GQLAConfig, *, torch_dtype: str) -> dict:
    """config.json of the "gqla" layout."""
    return {
        "model_type": "gqla", "architectures": ["GQLAForCausalLM"],
        **_latent_config_fields(mw, cfg, kv_heads=cfg.num_query_groups, torch_dtype=torch_dtype),
        "rope_interleave": True, "latent_layernorm_eps": cfg.layernorm_epsilon,
        "qk_layernorm": cfg.qk_layernorm, "softmax_scale": cfg.softmax_scale,
    }


def deepseek_v3_config(mw: rm.ModelWeights, cfg: GQLAConfig, *, rope_interleave: bool,
                       torch_dtype: str, max_position_embeddings: int = 4096) -> dict:
    """config.json of the "deepseek_v3" layout (transformers' DeepseekV3Config fields)."""
    return {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
        **_latent_config_fields(mw, cfg, kv_heads=cfg.num_attention_heads, torch_dtype=torch_dtype),
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "rope_interleave": rope_interleave,
        # every layer dense: the MoE fields are required integers but never used
        "first_k_dense_replace": len(mw.layers), "n_routed_experts": 1, "n_shared_experts": 1,
        "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1,
        "moe_intermediate_size": int(mw.layers[0].W_fc2.shape[1]), "num_nextn_predict_layers": 0,
        "max_position_embeddings": max_position_embeddings,
        "gqla_num_query_groups": cfg.num_query_groups,
    }


def _layer_tensors(i: int, lw: rm.LayerWeights, cfg: GQLAConfig, layout: str,
                   rope_interleave: bool) -> Dict[str, Tensor]:
    w = lw.attn
    H, N, R = cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim
    W_UQ, W_KR = w.W_UQ, w.W_KR
    if layout == "deepseek_v3" and not rope_interleave:
        perm = interleaved_to_half_split_rows(R)
        W_UQ = W_UQ.view(H, N + R, -1)
        W_UQ = torch.cat([W_UQ[:, :N], W_UQ[:, N:][:, perm]], 1).reshape(H * (N + R), -1)
        W_KR = W_KR[perm]
    W_UKV = w.W_UKV if layout == "gqla" else ref.mla_layout_up_proj(w, cfg)
    p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    out = {p + "input_layernorm.weight": lw.input_norm}
    if cfg.q_lora_rank is None:
        out[a + "q_proj.weight"] = W_UQ
    else:
        out[a + "q_a_proj.weight"] = w.W_DQ
        if w.q_norm is not None:
            out[a + "q_a_layernorm.weight"] = w.q_norm
        out[a + "q_b_proj.weight"] = W_UQ
    out[a + "kv_a_proj_with_mqa.weight"] = torch.cat([w.W_DKV, W_KR], 0)
    if w.kv_norm is not None:
        out[a + "kv_a_layernorm.weight"] = w.kv_norm
    out[a + "kv_b_proj.weight"] = W_UKV
    out[a + "o_proj.weight"] = w.W_O
    gate, up = lw.W_fc1.chunk(2, 0)
    out[p + "post_attention_layernorm.weight"] = lw.mlp_norm
    out[p + "mlp.gate_proj.weight"] = gate
    out[p + "mlp.up_proj.weight"] = up
    out[p + "mlp.down_proj.weight"] = lw.W_fc2
    return out


def _check_model(mw: rm.ModelWeights, cfg: GQLAConfig) -> None:
    if not isinstance(cfg, GQLAConfig):
        raise ValueError(f"cfg must be a GQLAConfig, got {type(cfg).__name__}")
    if not mw.layers:
        raise ValueError("ModelWeights.layers is empty")
    D = cfg.hidden_size
    if mw.embedding.ndim != 2 or mw.embedding.shape[1] != D:
        raise ValueError(f"ModelWeights.embedding has shape {tuple(mw.embedding.shape)}, expected (vocab, {D})")
    if tuple(mw.output.shape) != tuple(mw.embedding.shape):
        raise ValueError(f"ModelWeights.output has shape {tuple(mw.output.shape)}, expected "
                         f"{tuple(mw.embedding.shape)}")
    if tuple(mw.final_norm.shape) != (D,):
        raise ValueError(f"ModelWeights.final_norm has shape {tuple(mw.final_norm.shape)}, expected ({D},)")
    F = mw.layers[0].W_fc2.shape[1]
    for i, lw in enumerate(mw.layers):
        lw.attn.check(cfg)
        for name, t, shape in (("input_norm", lw.input_norm, (D,)), ("mlp_norm", lw.mlp_norm, (D,)),
                               ("W_fc1", lw.W_fc1, (2 * F, D)), ("W_fc2", lw.W_fc2, (D, F))):
            if tuple(t.shape) != shape:
                raise ValueError(f"ModelWeights.layers[{i}].{name} has shape {tuple(t.shape)}, "
                                 f"expected {shape}")


def _write_safetensors(tensors: Dict[str, Tensor], out_dir: str, max_shard_bytes: Optional[int]) -> None:
    from safetensors.torch import save_file

    names = list(tensors)
    shards: List[List[str]] = [[]]
    size = 0
    for n in names:
        nb = tensors[n].numel() * tensors[n].element_size()
        if max_shard_bytes is not None and shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    if len(shards) == 1:
        save_file({n: tensors[n] for n in shards[0]}, os.path.join(out_dir, _SINGLE),
                  metadata={"format": "pt"})
        return
    wmap, total = {}, 0
    for k, sh in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in sh}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for n in sh:
            wmap[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    with open(os.path.join(out_dir, _INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, fh, indent=2)


_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
           torch.float64: "float64"}


def save_hf_gqla(model_dir: str, mw: rm.ModelWeights, cfg: GQLAConfig, *, layout: str = "gqla",
                 dtype: Optional[torch.dtype] = None, tokenizer_path: Optional[str] = None,
                 rope_interleave: bool = True, allow_eps_mismatch: bool = False,
                 max_shard_bytes: Optional[int] = None) -> str:
    """Write GQLA reference weights as a HF safetensors directory ``model_dir`` (see module doc).

    ``layout``: "gqla" (kv_b_proj one block per group) or "deepseek_v3" (blocks repeated per
    head, loadable by transformers' DeepseekV3ForCausalLM). ``dtype``: storage dtype (default:
    the embedding's). ``rope_interleave`` only applies to "deepseek_v3". ``max_shard_bytes``
    splits the tensors over several files with a model.safetensors.index.json.
    Written to a temporary sibling directory and renamed; returns ``model_dir``."""
    if layout not in GQLA_LAYOUTS:
        raise ValueError(f"layout must be one of {GQLA_LAYOUTS}, got {layout!r}")
    if os.path.exists(model_dir):
        raise ValueError(f"output path {model_dir!r} already exists; refusing to overwrite it")
    parent = os.path.dirname(os.path.abspath(model_dir))
    if not os.path.isdir(parent):
        raise ValueError(f"parent directory of the output path {parent!r} does not exist")
    if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
        raise ValueError(f"tokenizer_path {tokenizer_path!r} is not a file")
    dtype = mw.embedding.dtype if dtype is None else dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if layout == "gqla" and not rope_interleave:
        raise ValueError("rope_interleave=False applies only to layout='deepseek_v3' (the gqla "
                         "layout always stores the reference's interleaved RoPE rows)")
    _check_model(mw, cfg)
    if layout == "deepseek_v3":
        if not cfg.qk_layernorm:
            raise ValueError("layout 'deepseek_v3' needs GQLAConfig.qk_layernorm=True: DeepSeek-V3 "
                             "always applies kv_a_layernorm (and q_a_layernorm), which cannot "
                             "represent 'no norm'; export this model with layout='gqla'")
        if cfg.layernorm_epsilon != _DEEPSEEK_NORM_EPS and not allow_eps_mismatch:
            raise ValueError(f"GQLAConfig.layernorm_epsilon is {cfg.layernorm_epsilon}, but "
                             f"transformers' DeepSeek-V3 applies its q_a/kv_a layernorms with eps "
                             f"{_DEEPSEEK_NORM_EPS}: pass allow_eps_mismatch=True to export anyway "
                             f"(approximate)")
    tensors: Dict[str, Tensor] = {"model.embed_tokens.weight": mw.embedding}
    for i, lw in enumerate(mw.layers):
        tensors.update(_layer_tensors(i, lw, cfg, layout, rope_interleave))
    tensors["model.norm.weight"] = mw.final_norm
    tied = _is_tied(mw)
    if not tied:
        tensors["lm_head.weight"] = mw.output
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in tensors.items()}
    hf_cfg = (gqla_hf_config(mw, cfg, torch_dtype=_DTYPES[dtype]) if layout == "gqla" else
              deepseek_v3_config(mw, cfg, rope_interleave=rope_interleave,
                                 torch_dtype=_DTYPES[dtype]))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(model_dir))}.tmp-", dir=parent)
    try:
        _write_safetensors(tensors, tmp, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(hf_cfg, fh, indent=2)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
            side = os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)), "tokenizer_config.json")
            if os.path.isfile(side):
                shutil.copyfile(side, os.path.join(tmp, "tokenizer_config.json"))
        os.rename(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir


# ----------------------------------------------------------------------------------------
# 2a. GQLA-layout import
# ----------------------------------------------------------------------------------------
def _gqla_config_from_hf(c: dict) -> Tuple[GQLAConfig, int, int, int, float, bool]:
    if c.get("model_type") != "gqla":
        raise ValueError(f"config.json field 'model_type' is {c.get('model_type')!r}, expected "
                         f"'gqla' (layout='gqla' export)")
    if c.get("rope_interleave", True) is not True:
        raise ValueError("config.json field 'rope_interleave' must be true for the gqla layout")
    if c.get("rope_scaling") not in (None, {}):
        raise ValueError(f"config.json field 'rope_scaling' is {c['rope_scaling']!r}: not supported")
    q = c.get("q_lora_rank")
    try:
        cfg = GQLAConfig(
            hidden_size=_cfg_int(c, "hidden_size"), num_attention_heads=_cfg_int(c, "num_attention_heads"),
            num_query_groups=_cfg_int(c, "num_key_value_heads"), kv_lora_rank=_cfg_int(c, "kv_lora_rank"),
            qk_head_dim=_cfg_int(c, "qk_nope_head_dim"), qk_pos_emb_head_dim=_cfg_int(c, "qk_rope_head_dim"),
            v_head_dim=_cfg_int(c, "v_head_dim"),
            q_lora_rank=None if q is None else _cfg_int(c, "q_lora_rank"),
            rotary_base=_cfg_float(c, "rope_theta"),
            layernorm_epsilon=_cfg_float(c, "latent_layernorm_eps"),
            qk_layernorm=bool(c.get("qk_layernorm", True)))
    except ValueError as e:
        raise ValueError(f"config.json does not describe a valid GQLA model: {e}") from e
    return (cfg, _cfg_int(c, "num_hidden_layers"), _cfg_int(c, "vocab_size"),
            _cfg_int(c, "intermediate_size"), _cfg_float(c, "rms_norm_eps"),
            bool(c.get("tie_word_embeddings", False)))


def _take_query(st, a: str, cfg: GQLAConfig, *, with_norm: bool):
    """(W_DQ, q_norm, W_UQ) of one layer: q_proj without a query latent, else q_a_proj,
    q_a_layernorm (when ``with_norm``) and q_b_proj. Rows stay in the file's RoPE order."""
    D, H, Q = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank
    rows = H * (cfg.qk_head_dim + cfg.qk_pos_emb_head_dim)
    if Q is None:
        return None, None, st.take(a + "q_proj.weight", (rows, D))
    return (st.take(a + "q_a_proj.weight", (Q, D)),
            st.take(a + "q_a_layernorm.weight", (Q,)) if with_norm else None,
            st.take(a + "q_b_proj.weight", (rows, Q)))


def _take_layer(st, p: str, attn, D: int, F: int) -> rm.LayerWeights:
    """One decoder layer around ``attn``: the two RMSNorms and the SwiGLU MLP (Megatron's fc1
    rows [gate ; up])."""
    gate = st.take(p + "mlp.gate_proj.weight", (F, D))
    up = st.take(p + "mlp.up_proj.weight", (F, D))
    return rm.LayerWeights(input_norm=st.take(p + "input_layernorm.weight", (D,)), attn=attn,
                           mlp_norm=st.take(p + "post_attention_layernorm.weight", (D,)),
                           W_fc1=torch.cat([gate, up], 0), W_fc2=st.take(p + "mlp.down_proj.weight", (D, F)))


def load_hf_gqla(model_dir: str, *, dtype: Optional[torch.dtype] = None
                 ) -> Tuple[rm.ModelWeights, GQLAConfig, Optional[str]]:
    """Read a layout="gqla" directory written by save_hf_gqla: (ModelWeights, GQLAConfig,
    tokenizer.json path or None). ``dtype`` None keeps the stored dtype (exact round trip)."""
    c = _read_config(model_dir)
    cfg, n_layers, vocab, F, eps, tied = _gqla_config_from_hf(c)
    st = _LazyTensors(model_dir, dtype)
    D, H, G, C = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_lora_rank
    N, R, V = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
    emb = st.take("model.embed_tokens.weight", (vocab, D))
    layers = []
    for i in range(n_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        W_DQ, q_norm, W_UQ = _take_query(st, a, cfg, with_norm=cfg.qk_layernorm)
        kv_a = st.take(a + "kv_a_proj_with_mqa.weight", (C + R, D))
        kv_norm = st.take(a + "kv_a_layernorm.weight", (C,)) if cfg.qk_layernorm else None
        attn = ref.GQLAWeights(W_UQ=W_UQ, W_DKV=kv_a[:C].clone(), W_KR=kv_a[C:].clone(),
                               W_UKV=st.take(a + "kv_b_proj.weight", (G * (N + V), C)),
                               W_O=st.take(a + "o_proj.weight", (D, H * V)), W_DQ=W_DQ,
                               q_norm=q_norm, kv_norm=kv_norm)
        layers.append(_take_layer(st, p, attn, D, F))
    final_norm = st.take("model.norm.weight", (D,))
    if tied:
        if st.has("lm_head.weight"):
            raise ValueError("config.json sets tie_word_embeddings but lm_head.weight is present")
        output = emb
    else:
        output = st.take("lm_head.weight", (vocab, D))
    st.finish("gqla")
    mw = rm.ModelWeights(embedding=emb, layers=layers, final_norm=final_norm, output=output, eps=eps)
    for lw in layers:
        lw.attn.check(cfg)
    return mw, cfg, _tokenizer_in(model_dir)


# ----------------------------------------------------------------------------------------
# 2b. dense DeepSeek-V3-layout (MLA) import
# ----------------------------------------------------------------------------------------
def _mla_config_from_hf(c: dict) -> Tuple[GQLAConfig, int, int, int, float, bool, bool]:
    if c.get("model_type") != "deepseek_v3":
        raise ValueError(f"config.json field 'model_type' is {c.get('model_type')!r}, expected "
                         f"'deepseek_v3'")
    n_layers = _cfg_int(c, "num_hidden_layers")
    fk = c.get("first_k_dense_replace", 3)
    if not isinstance(fk, int) or fk < n_layers:
        raise ValueError(f"config.json field 'first_k_dense_replace' is {fk!r} < num_hidden_layers "
                         f"({n_layers}): MoE layers are not supported (dense MLPs only)")
    if c.get("num_nextn_predict_layers", 0):
        raise ValueError(f"config.json field 'num_nextn_predict_layers' is "
                         f"{c['num_nextn_predict_layers']!r}: MTP layers are not supported")
    if c.get("attention_bias", False):
        raise ValueError("config.json field 'attention_bias' is true: biases are not supported")
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json field 'hidden_act' is {act!r}: only SiLU is supported")
    theta = _rope_theta(c)
    H = _cfg_int(c, "num_attention_heads")
    kvh = c.get("num_key_value_heads", H)
    if kvh not in (None, H):
        raise ValueError(f"config.json field 'num_key_value_heads' is {kvh!r}; the DeepSeek-V3 "
                         f"layout has one kv_b_proj block per head ({H})")
    q = c.get("q_lora_rank")
    try:
        cfg = GQLAConfig(
            hidden_size=_cfg_int(c, "hidden_size"), num_attention_heads=H, num_query_groups=H,
            kv_lora_rank=_cfg_int(c, "kv_lora_rank"), qk_head_dim=_cfg_int(c, "qk_nope_head_dim"),
            qk_pos_emb_head_dim=_cfg_int(c, "qk_rope_head_dim"), v_head_dim=_cfg_int(c, "v_head_dim"),
            q_lora_rank=None if q is None else _cfg_int(c, "q_lora_rank"), rotary_base=theta,
            layernorm_epsilon=_DEEPSEEK_NORM_EPS, qk_layernorm=True)
    except ValueError as e:
        raise ValueError(f"config.json does not describe a valid MLA model: {e}") from e
    return (cfg, n_layers, _cfg_int(c, "vocab_size"), _cfg_int(c, "intermediate_size"),
            _cfg_float(c, "rms_norm_eps"), bool(c.get("tie_word_embeddings", False)),
            bool(c.get("rope_interleave", True)))


def load_hf_mla(model_dir: str, *, dtype: Optional[torch.dtype] = torch.float32
                ) -> Tuple[rm.ModelWeights, GQLAConfig, Optional[str]]:
    """Read a dense DeepSeek-V3-layout directory as a per-head MLA model (module doc)."""
    c = _read_config(model_dir)
    cfg, n_layers, vocab, F, eps, tied, interleave = _mla_config_from_hf(c)
    st = _LazyTensors(model_dir, dtype)
    D, H, C = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    N, R, V = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
    back = torch.argsort(interleaved_to_half_split_rows(R))      # half-split -> interleaved
    emb = st.take("model.embed_tokens.weight", (vocab, D))
    layers = []
    for i in range(n_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        W_DQ, q_norm, W_UQ = _take_query(st, a, cfg, with_norm=True)
        kv_a = st.take(a + "kv_a_proj_with_mqa.weight", (C + R, D))
        W_KR = kv_a[C:]
        if not interleave:
            W_UQ = W_UQ.view(H, N + R, -1)
            W_UQ = torch.cat([W_UQ[:, :N], W_UQ[:, N:][:, back]], 1).reshape(H * (N + R), -1)
            W_KR = W_KR[back]
        attn = ref.GQLAWeights(W_UQ=W_UQ.contiguous(), W_DKV=kv_a[:C].clone(),
                               W_KR=W_KR.contiguous().clone(),
                               W_UKV=st.take(a + "kv_b_proj.weight", (H * (N + V), C)),
                               W_O=st.take(a + "o_proj.weight", (D, H * V)), W_DQ=W_DQ,
                               q_norm=q_norm, kv_norm=st.take(a + "kv_a_layernorm.weight", (C,)))
        layers.append(_take_layer(st, p, attn, D, F))
    final_norm = st.take("model.norm.weight", (D,))
    if tied:
        if st.has("lm_head.weight"):
            st.take("lm_head.weight", (vocab, D))
        output = emb
    else:
        output = st.take("lm_head.weight", (vocab, D))
    st.finish("deepseek_v3 (dense MLA)")
    mw = rm.ModelWeights(embedding=emb, layers=layers, final_norm=final_norm, output=output, eps=eps)
    for lw in layers:
        lw.attn.check(cfg)
    return mw, cfg, _tokenizer_in(model_dir)
