"""Megatron-Core layer specs for GQLA, one function for the local and the TE backend.

    get_gqla_layer_spec("local")   # Megatron-Core modules only: runs on CPU (gloo) and GPU
    get_gqla_layer_spec("te")      # Transformer Engine modules: fused norm+linear, FP8

FP8 is not a separate spec: it is the TE spec plus Megatron's ``fp8`` / ``fp8_recipe`` config
fields. The TE spec mirrors Megatron's own TE MLA spec (replicated ``TELinear`` down-
projections, latent norms fused into the up-projections, norm fused into ``linear_fc1``) with
``GQLASelfAttention`` in place of ``MLASelfAttention``; TE's ``DotProductAttention`` runs GQA with
``num_gqa_groups = num_query_groups`` and distinct K/V head dims.

The local spec uses ``GQLADotProductAttention`` (distinct K/V dims) and ``SPTorchNorm`` (works
with sequence parallel). Its checkpoint keys differ from the TE spec's in the norm names, as
Megatron's own MLA specs do.

For stock Megatron-LM (``pretrain_gpt.py --spec MODULE NAME``; Megatron imports NAME with
``vars(module)[NAME]``) see ``gqla_megatron.megatron.mlm_spec``.
"""

from __future__ import annotations

from typing import Union

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from gqla_megatron.megatron.layer import GQLADotProductAttention, GQLASelfAttention, SPTorchNorm

BACKENDS = ("local", "te")


class GQLALocalSpecProvider(LocalSpecProvider):
    """Megatron's local provider with GQLA's core attention and an SP-capable torch norm."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return SPTorchNorm

    def core_attention(self) -> type:
        return GQLADotProductAttention


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def get_backend(backend: Union[str, BackendSpecProvider]) -> BackendSpecProvider:
    """'local' -> GQLALocalSpecProvider; 'te' -> Megatron's TESpecProvider (needs TE)."""
    if not isinstance(backend, str):
        return backend
    if backend == "local":
        return GQLALocalSpecProvider()
    if backend == "te":
        if not te_available():
            raise ValueError("backend 'te' needs Transformer Engine (pip install "
                             "'gqla-megatron[te]' on a CUDA machine); use backend 'local' on CPU")
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def get_gqla_layer_spec(backend: Union[str, BackendSpecProvider] = "local",
                        qk_layernorm: bool = True) -> ModuleSpec:
    """Transformer layer spec (dense MLP) with GQLA self-attention for ``backend``."""
    provider = get_backend(backend)
    fused = provider.fuse_layernorm_and_linear()
    if fused:
        down = provider.linear()  # replicated ('duplicated') down-projections, as Megatron's MLA
        up = provider.column_parallel_layer_norm_linear() if qk_layernorm else provider.column_parallel_linear()
        latent_norm = IdentityOp  # fused into the up-projection
    else:
        down = provider.column_parallel_linear()
        up = provider.column_parallel_linear()
        latent_norm = provider.layer_norm(rms_norm=True, for_qk=True) if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=provider.layer_norm(),
            self_attention=ModuleSpec(
                module=GQLASelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=MLASelfAttentionSubmodules(
                    linear_q_proj=provider.column_parallel_linear(),
                    linear_q_down_proj=down,
                    linear_q_up_proj=up,
                    linear_kv_down_proj=down,
                    linear_kv_up_proj=up,
                    core_attention=provider.core_attention(),
                    linear_proj=provider.row_parallel_linear(),
                    q_layernorm=latent_norm,
                    kv_layernorm=latent_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if fused else provider.layer_norm(),
            mlp=get_mlp_module_spec_for_backend(backend=provider),
            mlp_bda=get_bias_dropout_add,
        ),
    )
