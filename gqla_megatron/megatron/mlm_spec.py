"""Layer specs as module-level objects, for stock Megatron-LM's ``--spec MODULE NAME``.

Megatron-LM imports the spec with ``vars(import_module(MODULE))[NAME]``, so the objects must
exist at import time:

    python pretrain_gpt.py ... --multi-latent-attention --group-query-attention \\
        --num-query-groups 8 --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64 \\
        --v-head-dim 128 --qk-layernorm --rope-type rope \\
        --spec gqla_megatron.megatron.mlm_spec gqla_te_layer_spec       # or gqla_local_layer_spec

Megatron-LM then builds an ``MLATransformerConfig`` whose ``num_query_groups`` is g; the GQLA
layer validates it (ValueError naming the field) when the model is built.
``gqla_te_layer_spec`` exists only where Transformer Engine imports.
"""

from gqla_megatron.megatron.spec import get_gqla_layer_spec, te_available

gqla_local_layer_spec = get_gqla_layer_spec("local")
if te_available():
    gqla_te_layer_spec = get_gqla_layer_spec("te")
