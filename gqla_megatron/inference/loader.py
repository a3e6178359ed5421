"""Load a GQLA checkpoint written by gqla-pretrain / gqla-convert (Megatron torch_dist) or an HF
GQLA-layout directory (``load_checkpoint`` picks by format) into reference weights.

Reads the tensors without building the Megatron model (``dist_checkpointing.load_plain_tensors``),
un-stacks Megatron's stacked layer keys (``decoder.layers.<param>`` with a leading layer axis)
and maps names through gqla_megatron.megatron.adapters. Model shapes come from the run's
``gqla_train_state.json``.

Any TP / PP layout: torch_dist stores every parameter as ONE global tensor (each rank writes its
slice at its global offset), so ``load_plain_tensors`` returns the TP=1 tensors whatever the
saving layout. That includes the two cases that look layout-dependent: the SwiGLU ``linear_fc1``
(Megatron's swiglu sharded factory stores the gate and up halves at their TP=1 offsets, not the
per-rank [gate_shard ; up_shard] order) and the column-parallel ``linear_kv_down_proj`` (rows
[W_DKV ; W_KR] split contiguously). tests/cpu/test_loader_tp.py checks TP=2 and PP=2 saves
against a TP=1 save of the same layout-invariant initialisation, tensor for tensor.
MTP depths (``mtp.layers.*``, from ``--mtp-num-layers``) are loaded into ``ModelWeights.mtp``.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from gqla_megatron.config import GQLAConfig


def _ensure_process_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(prefix="gqla_pg_"), 1),
                                rank=0, world_size=1)


def load_megatron_checkpoint(root: str):
    """(ModelWeights in float32, GQLAConfig, run args dict) of the latest checkpoint under root."""
    import gqla_megatron.megatron  # noqa: F401  (CPU patches)
    from megatron.core import dist_checkpointing

    from gqla_megatron.megatron import adapters
    from gqla_megatron.training.checkpoint import STATE, iter_dir, read_latest

    if not os.path.isdir(root):
        raise ValueError(f"--load {root}: no such directory")
    it = read_latest(root)
    if it is None:
        raise ValueError(f"--load {root}: no latest_checkpointed_iteration.txt (not a gqla-pretrain checkpoint)")
    path = iter_dir(root, it)
    with open(os.path.join(path, STATE)) as f:
        args = json.load(f)["args"]
    if args.get("attention", "gqla") != "gqla":
        raise ValueError(f"{path}: a {args['attention']!r} model, not GQLA")
    try:
        cfg = GQLAConfig.from_run_args(args)
    except KeyError as e:
        raise ValueError(f"{path}/{STATE}: args has no {e}") from e
    _ensure_process_group()
    raw = dist_checkpointing.load_plain_tensors(path)
    sd = {}
    for k, v in raw.items():
        if k.startswith("optimizer") or not isinstance(v, torch.Tensor):
            continue
        if k.startswith("decoder.layers.") and not k[len("decoder.layers."):].split(".")[0].isdigit():
            for i in range(v.shape[0]):
                sd[f"decoder.layers.{i}.{k[len('decoder.layers.'):]}"] = v[i].float()
        else:
            sd[k] = v.float()
    backend = "te" if args.get("transformer_impl") == "transformer_engine" else "local"
    mtp = int(args.get("mtp_num_layers") or 0)
    if adapters.num_mtp_layers(sd) != mtp:
        raise ValueError(f"{path}: the run args say mtp_num_layers={mtp} but the checkpoint holds "
                         f"{adapters.num_mtp_layers(sd)} MTP layers")
    mw = adapters.model_to_reference(sd, cfg, args["num_layers"], backend=backend, mtp_num_layers=mtp,
                                     eps=cfg.layernorm_epsilon)
    return mw, cfg, args


def load_checkpoint(root: str):
    """(ModelWeights, GQLAConfig, run dict, tokenizer.json path or None) from either format
    gqla-serve reads: a gqla-pretrain / gqla-convert Megatron checkpoint (torch_dist), or an HF
    directory in the GQLA layout written by ``gqla-convert export-hf --layout gqla`` (config.json
    with model_type "gqla" + safetensors)."""
    if os.path.isfile(os.path.join(root, "config.json")):
        from gqla_megatron.conversion import hf

        with open(os.path.join(root, "config.json")) as f:
            conf = json.load(f)
        if conf.get("model_type") != "gqla":
            raise ValueError(f"--load {root}: an HF directory of model_type {conf.get('model_type')!r}; "
                             f"gqla-serve reads the GQLA layout (gqla-convert export-hf --layout gqla)")
        mw, cfg, tok = hf.load_hf_gqla(root)
        return mw, cfg, {"seq_length": int(conf.get("max_position_embeddings") or 4096), "format": "hf_gqla"}, tok
    mw, cfg, args = load_megatron_checkpoint(root)
    tok = os.path.join(root, "tokenizer.json")
    return mw, cfg, args, tok if os.path.isfile(tok) else None

