"""Full (TP=1) tensors <-> this rank's tensor-parallel shard, for Megatron parameters.

A parameter with ``tensor_model_parallel=True`` is split evenly along ``partition_dim``; the
exception is a gated MLP's ``linear_fc1``, whose full weight is [gate ; up] while each rank
holds [gate_shard ; up_shard] (Megatron's swiglu sharding). TE marks some replicated tensors
(fused norm weights) TP-parallel too; those have the full shape and are returned whole.
"""

from __future__ import annotations

import torch


def tp_shard(name: str, param, full: torch.Tensor, *, gated_linear_unit: bool, tp_rank: int,
             tp_size: int) -> torch.Tensor:
    """This rank's shard of ``full`` for parameter ``name`` (``param`` gives shape/attributes)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    if tuple(param.shape) == tuple(full.shape):
        return full
    dim, size = param.partition_dim, param.shape[param.partition_dim]
    if full.shape[dim] != size * tp_size:
        raise ValueError(f"{name}: full size {full.shape[dim]} on dim {dim} is not TP={tp_size} x {size}")
    if name.endswith("mlp.linear_fc1.weight") and gated_linear_unit:
        half = size // 2
        return torch.cat([c.narrow(dim, tp_rank * half, half) for c in full.chunk(2, dim=dim)], dim)
    return full.narrow(dim, tp_rank * size, size)


def full_shape(name: str, param, tp_size: int) -> tuple:
    """The TP=1 shape of a (possibly sharded) parameter."""
    shape = list(param.shape)
    if param.ndim > 1 and getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def global_layer_key(key: str, offset: int) -> str:
    """'decoder.layers.<local i>.x' -> 'decoder.layers.<offset + i>.x' (pipeline stages)."""
    if key.startswith("decoder.layers."):
        head, rest = key[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{int(head) + offset}.{rest}"
    return key
