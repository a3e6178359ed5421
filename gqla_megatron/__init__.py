"""gqla-megatron: Group-Query Latent Attention (GQLA) for Megatron-Core.

Light on purpose: importing the package needs only torch. The Megatron-Core integration is
``gqla_megatron.megatron`` (needs megatron-core; Transformer Engine optional), the math truth
is ``gqla_megatron.reference``.
"""

__version__ = "0.1.0"

from gqla_megatron.config import GQLAConfig  # noqa: E402

__all__ = ["GQLAConfig", "__version__"]
