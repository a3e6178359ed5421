"""Megatron-Core integration of GQLA (needs megatron-core; Transformer Engine optional).

On a machine without CUDA, importing this package applies the CPU compatibility patches of
``gqla_megatron.megatron.cpu_compat`` (they are no-ops when CUDA is available).
"""

from gqla_megatron.megatron import cpu_compat as _cpu_compat

_cpu_compat.apply()

from gqla_megatron.megatron.config import GQLATransformerConfig, validate_gqla_transformer_config  # noqa: E402
from gqla_megatron.megatron.layer import GQLADotProductAttention, GQLASelfAttention, SPTorchNorm  # noqa: E402
from gqla_megatron.megatron.model import build_gqla_gpt_model, get_gqla_block_spec, tiny_config  # noqa: E402
from gqla_megatron.megatron.spec import get_gqla_layer_spec  # noqa: E402

__all__ = ["GQLATransformerConfig", "validate_gqla_transformer_config", "GQLASelfAttention",
           "GQLADotProductAttention", "SPTorchNorm", "get_gqla_layer_spec", "get_gqla_block_spec",
           "build_gqla_gpt_model", "tiny_config"]
