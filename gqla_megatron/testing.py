"""Test helpers shared by the test tiers: tolerances, comparison reports, and (for the
Megatron tiers) process-group setup and full <-> sharded state-dict plumbing.

Tolerance table (why each number):
  FP64_IDENTITY  1e-10  reference-vs-reference identities in float64; only summation order differs
  FP32_PARITY    1e-6   Megatron fp32 vs reference fp32 / TP vs TP=1: relative L2 error
                        ||a - b|| / ||b|| (fp32 eps is 1.2e-7; TP changes summation order)
  FP32_PARITY_MAX 5e-6  the same comparison, worst element relative to max |b| (measured worst
                        1.2e-6 over all parameters of the TP/PP/SP layouts; a real sharding bug,
                        e.g. upstream #1699, gives 0.7)
  BF16_COSINE    0.9999 bf16 vs fp32 reference (torchtitan / Megatron practice)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Dict, Iterator, Optional

import torch

FP64_IDENTITY = 1e-10
FP32_PARITY = 1e-6
FP32_PARITY_MAX = 5e-6
BF16_COSINE = 0.9999


def compare(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """max/mean abs diff, relative diff (to max |expected|), cosine, index of worst element."""
    a, e = actual.detach().double().flatten(), expected.detach().double().flatten()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch {tuple(actual.shape)} vs {tuple(expected.shape)}")
    d = (a - e).abs()
    scale = e.abs().max().clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(a, e, dim=0).item() if a.numel() else 1.0
    rel_l2 = ((a - e).norm() / e.norm().clamp_min(1e-30)).item() if a.numel() else 0.0
    return {"rel_l2": rel_l2, "max_abs": d.max().item() if d.numel() else 0.0, "mean_abs": d.mean().item() if d.numel() else 0.0,
            "rel": (d.max() / scale).item() if d.numel() else 0.0, "cos": cos,
            "worst": int(d.argmax()) if d.numel() else -1}


def exceeds(r: dict, *, rel_l2=None, rel=None, atol=None, cos=None) -> bool:
    return ((rel_l2 is not None and r["rel_l2"] > rel_l2) or (rel is not None and r["rel"] > rel)
            or (atol is not None and r["max_abs"] > atol) or (cos is not None and r["cos"] < cos))


def assert_close_report(name: str, actual, expected, *, rel_l2: Optional[float] = None,
                        rel: Optional[float] = None, atol: Optional[float] = None,
                        cos: Optional[float] = None) -> dict:
    """Compare and raise with the full report when any given limit is exceeded."""
    r = compare(actual, expected)
    if exceeds(r, rel_l2=rel_l2, rel=rel, atol=atol, cos=cos):
        raise AssertionError(f"{name}: {r} (limits rel_l2={rel_l2} rel={rel} atol={atol} cos={cos})")
    return r


# ---------------------------------------------------------------------------------------
# Megatron helpers (import megatron lazily)
# ---------------------------------------------------------------------------------------
def init_distributed() -> None:
    """gloo process group from torchrun's env, or a 1-process group for plain pytest."""
    import torch.distributed as dist

    import gqla_megatron.megatron  # noqa: F401  (CPU patches first)

    if dist.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    else:
        store = dist.FileStore(tempfile.mktemp(prefix="gqla_pg_"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)


@contextlib.contextmanager
def model_parallel(tp: int = 1, pp: int = 1, seed: int = 1234) -> Iterator[None]:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_distributed()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        ps.destroy_model_parallel()


def _global_key(name: str, offset: int) -> str:
    # imported here: gqla_megatron.megatron's package init imports megatron-core, which the
    # kernel tests on a bare GPU machine (no devkit) do not have
    from gqla_megatron.megatron.sharding import global_layer_key

    return global_layer_key(name, offset)


def _layer_offset(model) -> int:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(model.config)


def full_state_dict(model) -> Dict[str, torch.Tensor]:
    """Parameters of a TP=1, PP=1 model by name (no TE extra state), detached clones."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _tp_slice(name: str, param, full: torch.Tensor, config) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    from gqla_megatron.megatron.sharding import tp_shard

    return tp_shard(name, param, full, gated_linear_unit=config.gated_linear_unit,
                    tp_rank=ps.get_tensor_model_parallel_rank(),
                    tp_size=ps.get_tensor_model_parallel_world_size())


def load_full_state_dict(model, full: Dict[str, torch.Tensor]) -> None:
    """Copy full (TP=1, global-layer-numbered) tensors into this rank's shards of ``model``."""
    offset = _layer_offset(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = full[_global_key(name, offset)]
            p.copy_(_tp_slice(name, p, src, model.config).to(p.dtype))


def grad_errors(model, full_grads: Dict[str, torch.Tensor], *, sequence_parallel: bool) -> dict:
    """name -> compare() of this rank's gradient shard against the matching slice of a TP=1
    gradient. Sequence-parallel parameters (norms) get their partial gradients summed over TP
    first, as ``finalize_model_grads`` would."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    offset = _layer_offset(model)
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        if sequence_parallel and getattr(p, "sequence_parallel", False):
            dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())
        out[name] = compare(g, _tp_slice(name, p, full_grads[_global_key(name, offset)], model.config))
    return out


def sync_embedding_grads(model) -> None:
    """Sum the word-embedding gradients of the first and last pipeline stages, as
    ``finalize_model_grads`` (``_allreduce_word_embedding_grads``) does for models that are not
    wrapped in Megatron's DDP. The last stage holds a copy of the embedding when the output
    weights are tied or when it runs MTP (MTP embeds the shifted tokens)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tied = model.share_embeddings_and_output_weights
    if ps.get_pipeline_model_parallel_world_size() == 1 or not (tied or model.config.mtp_num_layers):
        return
    group = ps.get_embedding_group(check_initialized=False)
    if group is None or dist.get_rank() not in dist.get_process_group_ranks(group):
        return
    if model.pre_process or not tied:
        weight = model.embedding.word_embeddings.weight
    else:
        weight = model.output_layer.weight
    dist.all_reduce(weight.grad, group=group)


def assert_all_ranks(ok: bool, detail) -> None:
    """Fail on every rank if any rank failed, so no rank is left waiting in a collective."""
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag)
    assert ok, detail
    assert flag.item() == 0, "another rank failed this check (see its log)"


def random_model_weights(cfg, *, vocab: int = 100, layers: int = 2, seed: int = 0):
    """Reference-model weights (float32) for tests: random GQLA attention per layer, norms near 1,
    a SwiGLU MLP of width 2D, an untied LM head."""
    from gqla_megatron import reference as ref
    from gqla_megatron import reference_model as refm

    g = torch.Generator().manual_seed(seed)
    D = cfg.hidden_size

    def layer():
        return refm.LayerWeights(1 + 0.1 * torch.randn(D, generator=g),
                                 ref.GQLAWeights.random(cfg, generator=g, dtype=torch.float32),
                                 1 + 0.1 * torch.randn(D, generator=g), 0.05 * torch.randn(4 * D, D, generator=g),
                                 0.05 * torch.randn(D, 2 * D, generator=g))
    return refm.ModelWeights(torch.randn(vocab, D, generator=g), [layer() for _ in range(layers)],
                             torch.ones(D), 0.1 * torch.randn(vocab, D, generator=g))


def with_random_mtp(mw, cfg, *, depths: int = 2, seed: int = 1):
    """``mw`` with ``depths`` random MTP depths (unit norms, a projection of scale 1/sqrt(2D), the
    transformer layers of a second random model): enough for speculative-decoding plumbing
    tests, whose acceptance with random weights is near chance."""
    from gqla_megatron import reference_model as refm

    donor = random_model_weights(cfg, vocab=mw.embedding.shape[0], layers=depths, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    D = cfg.hidden_size
    mw.mtp = [refm.MTPWeights(torch.ones(D), torch.ones(D), torch.randn(D, 2 * D, generator=g) / (2 * D) ** 0.5,
                              lw, torch.ones(D)) for lw in donor.layers]
    return mw
