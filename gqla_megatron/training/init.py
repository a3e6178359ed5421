"""Parallel-layout-invariant initialisation: every parameter is drawn, in full, from a
generator seeded by (seed, its global name) and then sharded. A run therefore starts from the
same weights whatever its TP/PP/DP layout, so loss curves of different layouts are comparable
step by step (Megatron's own init consumes one RNG stream in build order, which differs
between pipeline stages). Costs one full-size draw per parameter on every rank."""

from __future__ import annotations

import math
import zlib

import torch


def layout_invariant_init_(model, config, seed: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from gqla_megatron.megatron.sharding import full_shape, global_layer_key, tp_shard
    from gqla_megatron.training.checkpoint import unwrap

    model = unwrap(model)
    offset = get_transformer_layer_offset(config)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    out_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # every 1-D parameter here is a norm weight (no linear biases)
                p.fill_(1.0)
                continue
            gname = global_layer_key(name, offset)
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(gname.encode())) % 2**62)
            std = out_std if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else config.init_method_std
            full = torch.randn(full_shape(name, p, tp_size), generator=g) * std
            p.copy_(tp_shard(name, p, full, gated_linear_unit=config.gated_linear_unit,
                             tp_rank=tp_rank, tp_size=tp_size).to(p.dtype))
