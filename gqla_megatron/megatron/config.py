"""Megatron-side GQLA config: ``GQLATransformerConfig`` extends Megatron's ``MLATransformerConfig``.

GQLA reuses Megatron's own fields: ``num_query_groups`` is g (the number of K/V up-projection
groups), the MLA dims are unchanged (``kv_lora_rank`` = r, ``qk_head_dim`` = d_n,
``qk_pos_emb_head_dim`` = d_r, ``v_head_dim`` = d_v, ``q_lora_rank`` = r_q). The same checks
run for a plain ``MLATransformerConfig`` when a GQLA layer is built from it (stock
Megatron-LM with ``--spec``), through ``validate_gqla_transformer_config``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_config import MLATransformerConfig

from gqla_megatron.config import GQLAConfig

FP8_ALIGN = 16  # TE FP8 GEMMs need every GEMM dim to be a multiple of 16 (32 for mxfp8)


def gqla_config_from(config: MLATransformerConfig) -> GQLAConfig:
    """The architecture-only ``GQLAConfig`` of a Megatron config (raises ValueError if invalid)."""
    if config.num_query_groups is None:
        raise ValueError("num_query_groups must be set to the number of GQLA KV groups g")
    return GQLAConfig(
        hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups, kv_lora_rank=config.kv_lora_rank,
        qk_head_dim=config.qk_head_dim, qk_pos_emb_head_dim=config.qk_pos_emb_head_dim,
        v_head_dim=config.v_head_dim, q_lora_rank=config.q_lora_rank,
        rotary_base=float(config.rotary_base), layernorm_epsilon=config.layernorm_epsilon,
        qk_layernorm=bool(config.qk_layernorm),
    )


def validate_gqla_transformer_config(config: MLATransformerConfig) -> GQLAConfig:
    """Check a Megatron config for GQLA; raise ValueError naming the offending field."""
    if not getattr(config, "multi_latent_attention", False):
        raise ValueError("multi_latent_attention must be True for GQLA (it is an MLA variant)")
    cfg = gqla_config_from(config)
    tp = config.tensor_model_parallel_size
    if cfg.num_query_groups % tp:
        raise ValueError(
            f"tensor_model_parallel_size ({tp}) must divide num_query_groups ({cfg.num_query_groups}): "
            f"each TP rank holds whole KV groups")
    if config.context_parallel_size != 1:
        raise ValueError(f"context_parallel_size ({config.context_parallel_size}) must be 1: context "
                         f"parallelism is not supported by the GQLA layer yet")
    if config.rope_type not in ("rope", "yarn"):
        raise ValueError(f"rope_type must be 'rope' or 'yarn', got {config.rope_type!r}")
    if config.rotary_percent != 1.0:
        raise ValueError(f"rotary_percent ({config.rotary_percent}) must be 1.0: the decoupled RoPE "
                         f"part (qk_pos_emb_head_dim) is rotated whole")
    if config.cache_mla_latents:
        raise ValueError("cache_mla_latents must be False: Megatron's latent-cache engine assumes "
                         "per-head up-projections; use gqla_megatron's decode paths")
    if getattr(config, "qk_clip", False):
        raise ValueError("qk_clip must be False: MuonClip assumes per-head K up-projections")
    if config.fp8:
        n_q = cfg.num_attention_heads * cfg.q_head_dim
        dims = {
            "hidden_size": cfg.hidden_size,
            "kv_lora_rank": cfg.kv_lora_rank,
            "kv_lora_rank + qk_pos_emb_head_dim": cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim,
            "num_attention_heads * (qk_head_dim + qk_pos_emb_head_dim) / TP": n_q // tp,
            "num_query_groups * (qk_head_dim + v_head_dim) / TP":
                cfg.num_query_groups * (cfg.qk_head_dim + cfg.v_head_dim) // tp,
            "num_attention_heads * v_head_dim / TP": cfg.num_attention_heads * cfg.v_head_dim // tp,
        }
        if cfg.q_lora_rank is not None:
            dims["q_lora_rank"] = cfg.q_lora_rank
        for name, value in dims.items():
            if value % FP8_ALIGN:
                raise ValueError(f"with fp8={config.fp8!r}, {name} ({value}) must be a multiple of "
                                 f"{FP8_ALIGN} (TE FP8 GEMM alignment)")
    return cfg


@dataclass
class GQLATransformerConfig(MLATransformerConfig):
    """``MLATransformerConfig`` for GQLA; ``num_query_groups`` is the number of KV groups g.

    Defaults differ from MLA's where GQLA models differ: plain RoPE (no YaRN scaling) and the
    latent RMSNorms on.
    """

    rope_type: str = "rope"
    """'rope' or 'yarn' (DeepSeek-V3 style); the decoupled RoPE part only."""
    rotary_scaling_factor: float = 1.0
    """YaRN scaling factor (1.0 = no scaling; MLA's default is 40)."""
    qk_layernorm: bool = True
    """RMSNorm on the q latent (if q_lora_rank) and on the kv latent, as DeepSeek-V2/V3."""
    normalization: str = "RMSNorm"
    """Norm of the transformer layers."""

    def __post_init__(self):
        if self.num_query_groups is None:
            raise ValueError("num_query_groups must be set to the number of GQLA KV groups g")
        # Our checks first, so users see GQLA messages rather than Megatron asserts.
        validate_gqla_transformer_config(self)
        super().__post_init__()

    @property
    def gqla(self) -> GQLAConfig:
        """The architecture-only config, as the reference and the converters use it."""
        return gqla_config_from(self)
