"""Checkpoints: Megatron torch_dist (dist_checkpointing) for model and optimizer, plus a JSON
file (iteration, LR schedule, args) and per-rank RNG states.

Layout (Megatron-LM's): ``SAVE/iter_0000100/`` and ``SAVE/latest_checkpointed_iteration.txt``.
A checkpoint is written into ``iter_XXXXXXX.tmp`` and renamed only after every rank finished;
``latest`` is then replaced atomically. A process killed during a save leaves a ``.tmp`` folder
that is never read, and ``latest`` still names the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

LATEST = "latest_checkpointed_iteration.txt"
STATE = "gqla_train_state.json"
OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}  # fully_sharded_model_space fails on 0.16


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest(root: str):
    """The iteration of the newest complete checkpoint under ``root``, or None."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, got {text!r}")
    it = int(text)
    if not os.path.isdir(iter_dir(root, it)):
        raise ValueError(f"{path} names iteration {it} but {iter_dir(root, it)} is missing")
    return it


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, s in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[f"tracker/{name}"] = s
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


def unwrap(model):
    """The GPTModel inside Megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_sharded_state_dict(model):
    """The model's sharded state dict with Megatron's DP/CP-group metadata set (0.16.1's
    GPTModel with MTP on a pipeline stage that holds no MTP layer dereferences it otherwise)."""
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    return model.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, extra: dict) -> str:
    """Save model, Megatron optimizer, scheduler and RNG; returns the checkpoint dir."""
    from megatron.core import dist_checkpointing

    model = unwrap(model)
    rank = dist.get_rank()
    final, tmp = iter_dir(root, iteration), iter_dir(root, iteration) + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd = _model_sharded_state_dict(model)
    sharded = {"model": model_sd,
               "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPT_METADATA)}
    dist_checkpointing.save(sharded, tmp)  # needs an empty directory
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        state = {"iteration": iteration, "opt_param_scheduler": scheduler.state_dict(),
                 "world_size": dist.get_world_size(), **extra}
        _atomic_write(os.path.join(tmp, STATE), json.dumps(state, indent=1, sort_keys=True, default=str))
    dist.barrier()
    if rank == 0:
        if os.path.exists(final):  # re-saving an iteration: keep the old one until the new is in place
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(os.path.join(root, LATEST), str(iteration))
    dist.barrier()
    return final


def load_checkpoint(root: str, model, optimizer, scheduler, *, finetune: bool = False) -> int:
    """Load the latest complete checkpoint under ``root``; returns its iteration. RNG states are
    restored when the world size matches the saving run's. ``finetune`` (Megatron-LM's
    --finetune), or a model-only checkpoint (gqla-convert output, ``"model_only": true`` in its
    state): load the weights only, keep the fresh optimizer and LR schedule, start at 0."""
    from megatron.core import dist_checkpointing

    model = unwrap(model)
    it = read_latest(root)
    if it is None:
        raise ValueError(f"--load {root}: no {LATEST} (nothing to resume from)")
    path = iter_dir(root, it)
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    model_sd = _model_sharded_state_dict(model)
    if finetune or state.get("model_only"):
        loaded = dist_checkpointing.load({"model": model_sd}, path)
        model.load_state_dict(loaded["model"])
        if dist.get_rank() == 0:
            why = "--finetune" if finetune else "a model-only checkpoint"
            print(f"gqla-pretrain: loaded the weights of {path} ({why}); optimizer, LR schedule and "
                  f"data position start fresh at iteration 0", flush=True)
        return 0
    sharded = {"model": model_sd,
               "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPT_METADATA)}
    loaded = dist_checkpointing.load(sharded, path)
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(state["opt_param_scheduler"])
    rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.pt")
    if state.get("world_size") == dist.get_world_size() and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return it
