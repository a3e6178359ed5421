"""Model builders: Megatron-Core ``GPTModel`` with GQLA layers (optionally an MTP block).

    config = tiny_config()                       # or GQLATransformerConfig(...)
    model = build_gqla_gpt_model(config, vocab_size=256, max_sequence_length=64, backend="local")

Under pipeline parallelism each stage builds only its own layers (``get_num_layers_to_build``);
``pre_process`` / ``post_process`` default to this rank's first / last stage. MTP layers
(``config.mtp_num_layers``) reuse the GQLA layer spec, as Megatron's MTP block does.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from megatron.core import parallel_state
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec_for_backend
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from gqla_megatron.megatron.config import GQLATransformerConfig
from gqla_megatron.megatron.spec import get_backend, get_gqla_layer_spec


def get_gqla_block_spec(config, backend: Union[str, BackendSpecProvider] = "local",
                        vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """Block spec with this pipeline stage's GQLA layers and the backend's final norm."""
    provider = get_backend(backend)
    layer = get_gqla_layer_spec(provider, qk_layernorm=config.qk_layernorm)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=provider.layer_norm())


def build_gqla_gpt_model(config, *, vocab_size: int, max_sequence_length: int,
                         backend: Union[str, BackendSpecProvider] = "local",
                         pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                         share_embeddings_and_output_weights: bool = False,
                         parallel_output: bool = True, vp_stage: Optional[int] = None) -> GPTModel:
    """A ``GPTModel`` whose attention layers are GQLA; RoPE lives inside the layers."""
    provider = get_backend(backend)
    block = get_gqla_block_spec(config, provider, vp_stage=vp_stage)
    mtp = None
    if config.mtp_num_layers:
        mtp = get_gpt_mtp_block_spec_for_backend(config=config, spec=block, backend=provider,
                                                 vp_stage=vp_stage)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        config=config, transformer_layer_spec=block, vocab_size=vocab_size,
        max_sequence_length=max_sequence_length, pre_process=pre_process,
        post_process=post_process, parallel_output=parallel_output,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope", mtp_block_spec=mtp, vp_stage=vp_stage)


def tiny_config(**overrides) -> GQLATransformerConfig:
    """The embedded default: a 2-layer GQLA model small enough for CPU tests and the demo
    (h_q = 8 heads in g = 4 groups, r = 32, d_n = 16, d_r = 8, d_v = 16, r_q = 24)."""
    kw = dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
        num_query_groups=4, kv_lora_rank=32, q_lora_rank=24, qk_head_dim=16,
        qk_pos_emb_head_dim=8, v_head_dim=16, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=torch.float32, init_method_std=0.05, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, layernorm_epsilon=1e-5,
    )
    kw.update(overrides)
    if kw.get("pipeline_model_parallel_size", 1) > 1:
        kw.setdefault("pipeline_dtype", kw["params_dtype"])
    return GQLATransformerConfig(**kw)
