"""GPT models with GQLA attention or a same-shape baseline (Megatron's MLA, Megatron's GQA)."""

from __future__ import annotations

from dataclasses import fields

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from gqla_megatron.megatron import GQLATransformerConfig, build_gqla_gpt_model
from gqla_megatron.megatron.spec import get_gqla_layer_spec

ATTENTIONS = ("gqla", "mla", "gqa")


def transformer_config(attention: str, common: dict, shape: dict, *, rotary_base: float = 10000.0,
                       qk_layernorm: bool = True):
    """Megatron config for one attention kind. ``common``: TransformerConfig fields;
    ``shape``: GQLA dims (num_query_groups, kv_lora_rank, q_lora_rank, qk_head_dim,
    qk_pos_emb_head_dim, v_head_dim); ``rotary_base`` / ``qk_layernorm`` (latent norms) apply to
    the latent attentions (GQA's RoPE base goes to ``build_model``)."""
    if attention == "gqla":
        return GQLATransformerConfig(**common, **shape, rotary_base=rotary_base, qk_layernorm=qk_layernorm)
    if attention == "mla":
        mla = dict(shape, num_query_groups=None)
        return MLATransformerConfig(**common, **mla, rope_type="rope", rotary_scaling_factor=1.0,
                                    qk_layernorm=qk_layernorm, normalization="RMSNorm",
                                    rotary_base=rotary_base)
    if attention == "gqa":
        names = {f.name for f in fields(TransformerConfig)}
        return TransformerConfig(**{k: v for k, v in common.items() if k in names},
                                 num_query_groups=shape["num_query_groups"],
                                 kv_channels=shape["qk_head_dim"], normalization="RMSNorm")
    raise ValueError(f"--attention must be one of {ATTENTIONS}, got {attention!r}")


def build_model(attention: str, config, *, vocab_size: int, seq_length: int, backend: str,
                rotary_base: float = None) -> GPTModel:
    """GPTModel for this pipeline stage. backend: 'local' or 'te'; ``rotary_base``: the GQA
    baseline's RoPE base (the latent attentions take theirs from the config)."""
    if attention == "gqla":
        return build_gqla_gpt_model(config, vocab_size=vocab_size, max_sequence_length=seq_length,
                                    backend=backend)
    te = backend == "te"
    if attention == "mla":
        # Same layer as GQLA's (norms, MLP, core attention) with Megatron's per-head MLA module:
        # the comparison isolates the attention. Note: Megatron's MLA carries upstream #1699.
        layer = get_gqla_layer_spec(backend, qk_layernorm=config.qk_layernorm)
        layer.submodules.self_attention.module = MLASelfAttention
    else:
        layer = (get_gpt_layer_with_transformer_engine_spec() if te
                 else get_gpt_layer_local_spec(normalization="RMSNorm"))
    mtp = (get_gpt_mtp_block_spec(config, layer, use_transformer_engine=te)
           if config.mtp_num_layers else None)
    return GPTModel(config=config, transformer_layer_spec=layer, vocab_size=vocab_size,
                    max_sequence_length=seq_length,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                    position_embedding_type="rope", mtp_block_spec=mtp,
                    rotary_base=int(getattr(config, "rotary_base", None) or rotary_base or 10000))


def flops_per_iteration(attention: str, a, tokens: int) -> float:
    """Model FLOPs of one training iteration (forward + backward = 3x forward), counting every
    GEMM (projections, MLP, LM head) and causal attention (half of the S x S scores).
    ``a``: resolved args. The MFU denominator uses these, not hardware counters."""
    D, L, H, F, V, S = a.hidden_size, a.num_layers, a.num_attention_heads, a.ffn_hidden_size, a.vocab_size, a.seq_length
    G, C, Q = a.num_query_groups, a.kv_lora_rank, a.q_lora_rank
    N, R, Vd = a.qk_head_dim, a.qk_pos_emb_head_dim, a.v_head_dim
    if attention == "gqa":
        proj = D * (H * N + 2 * G * N) + H * N * D
        attn = H * S * (N + N) / 2
    else:
        up_groups = H if attention == "mla" else G
        q = D * H * (N + R) if Q is None else D * Q + Q * H * (N + R)
        proj = q + D * (C + R) + C * up_groups * (N + Vd) + H * Vd * D
        attn = H * S * ((N + R) + Vd) / 2
    mlp = 3 * D * F  # SwiGLU: fc1 (2F x D) + fc2 (D x F)
    per_token = 2 * (L * (proj + mlp + attn) + D * V)
    return 3.0 * per_token * tokens
