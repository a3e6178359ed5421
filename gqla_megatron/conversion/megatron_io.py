r"""Megatron-Core checkpoints on the conversion side: read GQA sources, write GQA/GQLA outputs,
and the streamed (layer by layer) TransGQLA conversion of a checkpoint.

Reading a Megatron-Core GPT GQA checkpoint (no model is built)
--------------------------------------------------------------
``open_gqa_source(path)`` accepts the root of a checkpoint (``latest_checkpointed_iteration.txt``
and ``iter_XXXXXXX/``) or one ``iter_*`` / ``release`` directory, in either format:

- **torch_dist** (``.metadata`` + ``__*.distcp``, what gqla-pretrain and Megatron-LM write). The
  DCP metadata is read first (global shapes, and the byte range of every stored chunk: a file
  shorter than its chunks is rejected before any work). Layer parameters are either *stacked*
  (``decoder.layers.<param>`` with a leading layer axis, Megatron's default for homogeneous
  layers) or per layer (``decoder.layers.<i>.<param>``); both are read. ``read_layer`` loads only
  that layer's chunks (a small DCP load planner requests one slice of the stacked tensor), so
  the layer axis is never materialised. Global tensors in torch_dist are TP-independent (TP is a
  chunking of the same global tensor; SwiGLU fc1 is stored as global [gate ; up]).
- **legacy** ``iter_*/mp_rank_TT[_PPP]/model_optim_rng.pt`` for any TP x PP grid. Files are
  loaded with ``torch.load(weights_only=True, mmap=True)`` (mmap: tensors stay on disk until
  touched); ``argparse.Namespace``, numpy's array reconstruction and Megatron's enums are
  allow-listed because Megatron-LM pickles its ``args`` Namespace and numpy RNG state into
  every shard. TP shards are concatenated per parameter: column-parallel (``linear_qkv``,
  ``linear_fc1``) on dim 0, row-parallel (``linear_proj``, ``linear_fc2``) on dim 1, embedding
  and output layer on the vocab dim 0; SwiGLU ``linear_fc1`` shards are [gate_r ; up_r] per
  rank and are regrouped to [gate ; up]. Pipeline stages hold local layer numbers; stage p's
  offset is the number of layers in stages 0..p-1 (counted from the files, so uneven splits
  work). Replicated 1-D norms must be identical on every TP rank.

The fused ``linear_qkv`` is group-major: for KV group j, rows [q heads j*m .. j*m+m-1 ; k_j ; v_j]
(m = H/g, each d rows); ``unpack_qkv`` / ``pack_qkv`` convert. Every source model tensor is
used exactly once: an unknown leftover key is an error that names it (TE ``_extra_state``,
optimizer, RNG and scheduler entries are not model tensors).

Model shapes come from the run's ``gqla_train_state.json`` ("args", gqla-pretrain) or from the
``args`` Namespace Megatron-LM stores (``common.pt`` for torch_dist, every legacy shard). A
checkpoint without either is rejected with the list of files looked for.

Peak memory while reading: torch_dist, one layer's tensors plus the embedding/output when they
are read; legacy, the touched pages of the mmapped shard files (one layer of every TP rank at a
time) plus one full layer. ``read_gqa_checkpoint`` materialises the whole model (tests, small
models); the streamed conversion never does.

Writing
-------
``GPTCheckpointWriter`` builds the target Megatron GPT model (GQLA via ``build_gqla_gpt_model``,
or the GQA baseline of ``training.models``) at TP = PP = 1 in this process, copies full tensors
into it, and saves ``{"model": model.sharded_state_dict()}`` with ``dist_checkpointing`` (torch_dist)
in gqla-pretrain's layout: ``<out>/iter_0000000/`` + ``latest_checkpointed_iteration.txt`` +
``iter_0000000/gqla_train_state.json`` ({"iteration": 0, "args": {...}, "model_only": true}).
torch_dist stores global tensors, so the checkpoint is independent of the layout it was saved
from; the *target* TP/PP are recorded in the args (``tensor_model_parallel_size`` ...) and any
layout whose TP divides g loads it (Megatron reshards on load; tests/dist/test_convert_tp.py
loads a TP=1-saved conversion at TP=1 and TP=4). Everything is written under ``<out>.tmp-<pid>``
and renamed to ``<out>`` at the end; a failure removes the temp dir.

Streamed conversion
-------------------
``convert_checkpoint`` runs TransGQLA (``transgqla.convert_layer``) layer by layer: the
calibration hidden states (N x S x D, float32) are pushed through the source one layer at a
time (second moment of the attention input, float64, accumulated on ``device``), the layer is
converted (covariances / eigh / PCA on ``device`` in float64), copied into the target model and
freed. Held-out perplexity before/after is computed the same way (source and converted hidden
states advanced in step). Peak memory: the target model (params x dtype bytes) + one source and
one converted layer in float64 + the hidden states + one window's logits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from gqla_megatron.conversion.gguf_import import GQALayerWeights, GQAModelConfig, GQAModelWeights

__all__ = [
    "unpack_qkv", "pack_qkv", "gqa_config_from_args", "GQASource", "MemorySource",
    "open_gqa_source", "read_gqa_checkpoint", "GPTCheckpointWriter", "gqa_state_dict",
    "save_gqa_checkpoint", "ConvertOptions", "validate_convert_options", "convert_checkpoint",
    "peak_rss_mb", "resolve_checkpoint_dir",
]

LATEST = "latest_checkpointed_iteration.txt"
STATE = "gqla_train_state.json"

# Source GQA layer tensors: role -> accepted Megatron names (relative to the layer). torch_dist
# uses the TE names for the norms on both specs (the local spec maps them on save).
_LAYER_ROLES = {
    "attn_norm": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    "qkv": ("self_attention.linear_qkv.weight",),
    "W_O": ("self_attention.linear_proj.weight",),
    "mlp_norm": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    "W_fc1": ("mlp.linear_fc1.weight",),
    "W_fc2": ("mlp.linear_fc2.weight",),
}
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
# TP merge rule of a legacy shard: key suffix -> concat dim (None: replicated)
_TP_DIM = {"linear_qkv.weight": 0, "linear_fc1.weight": 0, "linear_proj.weight": 1,
           "linear_fc2.weight": 1, EMBEDDING: 0, OUTPUT: 0}
# keys that mark an MLA / GQLA checkpoint
_MLA_MARKERS = ("linear_kv_down_proj", "linear_kv_up_proj", "linear_q_down_proj", "linear_q_proj")


def _is_model_key(key: str) -> bool:
    return (key.startswith(("embedding.", "decoder.", "output_layer.")) and "_extra_state" not in key
            and not key.endswith("inv_freq"))


# ----------------------------------------------------------------------------------------
# fused QKV
# ----------------------------------------------------------------------------------------
def unpack_qkv(W: Tensor, num_heads: int, num_groups: int, head_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Group-major Megatron ``linear_qkv`` weight ((H + 2g) d, D) -> (W_Q (H d, D), W_K, W_V (g d, D)).
    Query head j*m + i is slot i of group j; slots m, m+1 are k_j, v_j."""
    H, g, d = num_heads, num_groups, head_dim
    if H % g or W.ndim != 2 or W.shape[0] != (H + 2 * g) * d:
        raise ValueError(f"linear_qkv has shape {tuple(W.shape)}, expected ({(H + 2 * g) * d}, D) for "
                         f"{H} heads, {g} groups, head dim {d}")
    m = H // g
    blocks = W.reshape(g, m + 2, d, W.shape[1])
    return (blocks[:, :m].reshape(H * d, -1).contiguous(), blocks[:, m].reshape(g * d, -1).contiguous(),
            blocks[:, m + 1].reshape(g * d, -1).contiguous())


def pack_qkv(W_Q: Tensor, W_K: Tensor, W_V: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """Inverse of ``unpack_qkv``."""
    H, g = num_heads, num_groups
    d = W_K.shape[0] // g
    D = W_Q.shape[1]
    q = W_Q.reshape(g, H // g, d, D)
    return torch.cat([q, W_K.reshape(g, 1, d, D), W_V.reshape(g, 1, d, D)], 1).reshape(-1, D)


# ----------------------------------------------------------------------------------------
# config from run args
# ----------------------------------------------------------------------------------------
def gqa_config_from_args(args: dict, *, vocab_size: int, where: str) -> GQAModelConfig:
    """GQAModelConfig from gqla-pretrain args (``attention`` = 'gqa', ``qk_head_dim``) or
    Megatron-LM args (``kv_channels``, ``group_query_attention``, ``norm_epsilon``, ...).
    Rejects MLA/GQLA runs and features the GQA reader does not implement, naming the arg."""
    att = args.get("attention")
    if att in ("gqla", "mla") or args.get("multi_latent_attention"):
        kind = att or "mla"
        raise ValueError(f"{where}: the source is a {kind.upper()} checkpoint (args attention="
                         f"{kind!r}), not GQA; gqa-to-gqla needs a Megatron GQA checkpoint "
                         f"(use mla-to-gqla for MLA)")
    checks = {"add_bias_linear": (False, "linear biases"), "add_qkv_bias": (False, "QKV biases"),
              "qk_layernorm": (False, "QK layernorm"), "apply_layernorm_1p": (False, "layernorm-1p"),
              "rotary_interleaved": (False, "interleaved RoPE"), "swiglu": (True, "a non-SwiGLU MLP")}
    for k, (ok, what) in checks.items():
        if k in args and args[k] is not None and bool(args[k]) != ok:
            raise ValueError(f"{where}: args {k}={args[k]!r}: {what} is not supported by the GQA reader")
    if args.get("normalization", "RMSNorm") != "RMSNorm":
        raise ValueError(f"{where}: args normalization={args['normalization']!r}; only RMSNorm is supported")
    if args.get("position_embedding_type", "rope") != "rope":
        raise ValueError(f"{where}: args position_embedding_type={args['position_embedding_type']!r}; "
                         f"only rope is supported")
    if float(args.get("rotary_percent", 1.0) or 1.0) != 1.0:
        raise ValueError(f"{where}: args rotary_percent={args['rotary_percent']!r}; partial RoPE "
                         f"sources are not supported")
    for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        if args.get(k) is None:
            raise ValueError(f"{where}: args has no {k!r}")
    H = int(args["num_attention_heads"])
    if "attention" in args:                     # gqla-pretrain
        g, d = args.get("num_query_groups"), args.get("qk_head_dim")
    else:                                       # Megatron-LM
        g = args.get("num_query_groups") if args.get("group_query_attention") else H
        d = args.get("kv_channels") or int(args["hidden_size"]) // H
    if g is None or d is None:
        raise ValueError(f"{where}: args lacks num_query_groups / qk_head_dim (kv_channels)")
    eps = args.get("layernorm_epsilon", args.get("norm_epsilon", 1e-5))
    try:
        return GQAModelConfig(
            hidden_size=int(args["hidden_size"]), num_layers=int(args["num_layers"]), num_attention_heads=H,
            num_kv_heads=int(g), head_dim=int(d), ffn_hidden_size=int(args["ffn_hidden_size"]),
            vocab_size=int(vocab_size), rope_base=float(args.get("rotary_base") or 10000.0),
            eps=float(eps or 1e-5), context_length=args.get("seq_length"))
    except ValueError as e:
        raise ValueError(f"{where}: args do not describe a valid GQA model: {e}") from e


# ----------------------------------------------------------------------------------------
# locating the checkpoint
# ----------------------------------------------------------------------------------------
def resolve_checkpoint_dir(path: str) -> Tuple[str, Optional[int]]:
    """(iteration directory, iteration or None) for a checkpoint root or an iter_* directory."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such checkpoint directory")
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory (a Megatron checkpoint is a directory)")
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        text = open(latest).read().strip()
        if text == "release":
            d, it = os.path.join(path, "release"), None
        elif text.isdigit():
            d, it = os.path.join(path, f"iter_{int(text):07d}"), int(text)
        else:
            raise ValueError(f"{latest}: expected an iteration number or 'release', got {text!r}")
        if not os.path.isdir(d):
            raise ValueError(f"{latest} names {os.path.basename(d)} but {d} is missing")
        return d, it
    base = os.path.basename(os.path.normpath(path))
    m = re.fullmatch(r"iter_(\d+)", base)
    if m or base == "release":
        return path, int(m.group(1)) if m else None
    raise ValueError(f"{path}: not a Megatron checkpoint (no {LATEST}, not an iter_* directory)")


def _safe_globals() -> list:
    import argparse

    allowed: list = [argparse.Namespace]
    try:
        import numpy as np

        allowed += [np.ndarray, np.dtype]
        for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
            try:
                allowed.append(__import__(mod, fromlist=["_reconstruct"])._reconstruct)
                break
            except (ImportError, AttributeError):
                continue
        allowed += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32)]
    except ImportError:
        pass
    try:
        from megatron.core import enums as core_enums
        from megatron.core.transformer import enums as tr_enums

        for mod in (core_enums, tr_enums):
            allowed += [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, __import__("enum").Enum)]
    except ImportError:
        pass
    return allowed


def _torch_load(path: str, *, mmap: bool = True):
    """weights_only torch.load with the allow-list above; clear errors for corrupt files."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing")
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if mmap and "mmap" in str(e).lower():   # old (non-zip) serialization cannot be mmapped
                return _torch_load(path, mmap=False)
            raise ValueError(f"{path}: unreadable or truncated ({str(e).splitlines()[0]})") from e
        except __import__("pickle").UnpicklingError as e:
            raise ValueError(f"{path}: refused by weights_only loading ({str(e).splitlines()[0][:300]})") from e
        except (EOFError, OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable or truncated ({e})") from e


def _namespace_to_dict(ns) -> dict:
    return dict(vars(ns)) if hasattr(ns, "__dict__") else dict(ns)


# ----------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------
class GQASource:
    """A GQA model readable layer by layer: ``cfg``, ``tied_output``, ``read_embedding``,
    ``read_layer(l)``, ``read_final_norm``, ``read_output`` and ``finish`` (every tensor used)."""

    cfg: GQAModelConfig
    tied_output: bool
    description: str
    storage_dtype: torch.dtype
    args: dict

    def read_embedding(self) -> Tensor: ...
    def read_layer(self, l: int) -> GQALayerWeights: ...
    def read_final_norm(self) -> Tensor: ...
    def read_output(self) -> Optional[Tensor]: ...
    def finish(self) -> None: ...

    def read_all(self) -> GQAModelWeights:
        """Materialise the whole model (float32)."""
        emb = self.read_embedding()
        layers = [self.read_layer(l) for l in range(self.cfg.num_layers)]
        fn = self.read_final_norm()
        out = self.read_output()
        self.finish()
        return GQAModelWeights(embedding=emb, layers=layers, final_norm=fn,
                               output=emb if out is None else out, tied_output=out is None)


class MemorySource(GQASource):
    """A GQAModelWeights already in memory (e.g. a GGUF import) behind the GQASource API."""

    def __init__(self, w: GQAModelWeights, cfg: GQAModelConfig, description: str = "in-memory",
                 args: Optional[dict] = None):
        if w.rope_layout != "half_split":
            raise ValueError(f"rope_layout is {w.rope_layout!r}; the converter needs half-split rows")
        self.w, self.cfg, self.tied_output, self.description = w, cfg, w.tied_output, description
        self.storage_dtype, self.args = w.embedding.dtype, dict(args or {})

    def read_embedding(self):
        return self.w.embedding.float()

    def read_layer(self, l):
        lw = self.w.layers[l]
        return GQALayerWeights(**{k: getattr(lw, k).float() for k in GQALayerWeights.__dataclass_fields__})

    def read_final_norm(self):
        return self.w.final_norm.float()

    def read_output(self):
        return None if self.w.tied_output else self.w.output.float()

    def finish(self):
        pass


class _KeyedSource(GQASource):
    """Common part of the two Megatron formats: a logical key space of full tensors
    (``decoder.layers.<global i>.<param>``) with shapes, read on demand."""

    def _setup(self, args: dict, where: str):
        keys = set(self._shapes)
        mla = sorted(k for k in keys if any(m in k for m in _MLA_MARKERS))
        if mla:
            raise ValueError(f"{where}: the source is an MLA/GQLA checkpoint ({mla[0]}), not GQA; "
                             f"gqa-to-gqla needs a Megatron GQA checkpoint")
        biases = sorted(k for k in keys if k.endswith(".bias"))
        if biases:
            raise ValueError(f"{where}: linear biases ({biases[0]}) are not supported by the GQA reader")
        if EMBEDDING not in keys:
            raise ValueError(f"{where}: missing key {EMBEDDING!r}")
        self.cfg = gqa_config_from_args(args, vocab_size=self._shapes[EMBEDDING][0], where=where)
        self.args, self.where = args, where
        c = self.cfg
        D, H, g, d, F, V = (c.hidden_size, c.num_attention_heads, c.num_kv_heads, c.head_dim,
                            c.ffn_hidden_size, c.vocab_size)
        self._role_key: Dict[Tuple[int, str], str] = {}
        want = {"attn_norm": (D,), "qkv": ((H + 2 * g) * d, D), "W_O": (D, H * d), "mlp_norm": (D,),
                "W_fc1": (2 * F, D), "W_fc2": (D, F)}
        for l in range(c.num_layers):
            for role, names in _LAYER_ROLES.items():
                found = [f"decoder.layers.{l}.{n}" for n in names if f"decoder.layers.{l}.{n}" in keys]
                if not found:
                    raise ValueError(f"{where}: missing key 'decoder.layers.{l}.{names[0]}'")
                k = found[0]
                if tuple(self._shapes[k]) != want[role]:
                    raise ValueError(f"{where}: {k} has shape {tuple(self._shapes[k])}, expected "
                                     f"{want[role]} for {c}")
                self._role_key[(l, role)] = k
        for k, shape in ((FINAL_NORM, (D,)), (EMBEDDING, (V, D))):
            if k not in keys:
                raise ValueError(f"{where}: missing key {k!r}")
            if tuple(self._shapes[k]) != shape:
                raise ValueError(f"{where}: {k} has shape {tuple(self._shapes[k])}, expected {shape}")
        untie = args.get("untie_embeddings_and_output_weights")
        self.tied_output = OUTPUT not in keys or untie is False
        if OUTPUT in keys and tuple(self._shapes[OUTPUT]) != (V, D):
            raise ValueError(f"{where}: {OUTPUT} has shape {tuple(self._shapes[OUTPUT])}, expected {(V, D)}")
        used = set(self._role_key.values()) | {EMBEDDING, FINAL_NORM, OUTPUT}
        extra = sorted(k for k in keys if k not in used)
        if extra:
            raise ValueError(f"{where}: model tensors the GQA reader does not use: {extra[:5]}"
                             f"{' ...' if len(extra) > 5 else ''}")
        self._used: set = set()

    def _take(self, keys: Sequence[str]) -> Dict[str, Tensor]:
        again = [k for k in keys if k in self._used]
        if again:
            raise ValueError(f"{self.where}: tensor {again[0]!r} read twice")
        self._used.update(keys)
        return self._read(keys)

    def read_embedding(self):
        return self._take([EMBEDDING])[EMBEDDING].float()

    def read_final_norm(self):
        return self._take([FINAL_NORM])[FINAL_NORM].float()

    def read_output(self):
        if OUTPUT not in self._shapes:
            return None
        out = self._take([OUTPUT])[OUTPUT].float()
        return None if self.tied_output else out   # tied: the last stage's copy of the embedding

    def read_layer(self, l):
        c = self.cfg
        if not 0 <= l < c.num_layers:
            raise ValueError(f"layer {l} out of range (num_layers {c.num_layers})")
        keys = {role: self._role_key[(l, role)] for role in _LAYER_ROLES}
        t = self._take(list(keys.values()))
        W_Q, W_K, W_V = unpack_qkv(t[keys["qkv"]].float(), c.num_attention_heads, c.num_kv_heads, c.head_dim)
        return GQALayerWeights(attn_norm=t[keys["attn_norm"]].float(), W_Q=W_Q, W_K=W_K, W_V=W_V,
                               W_O=t[keys["W_O"]].float(), mlp_norm=t[keys["mlp_norm"]].float(),
                               W_fc1=t[keys["W_fc1"]].float(), W_fc2=t[keys["W_fc2"]].float())

    def finish(self):
        left = sorted(k for k in self._shapes if k not in self._used)
        if left:
            raise ValueError(f"{self.where}: source tensors never read: {left[:5]}")


def _read_state_args(ckpt_dir: str) -> Optional[dict]:
    p = os.path.join(ckpt_dir, STATE)
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: unreadable ({e})") from e
    if not isinstance(state.get("args"), dict):
        raise ValueError(f"{p}: has no 'args' object")
    return state["args"]


def _verify_dcp_files(ckpt_dir: str, meta) -> None:
    """Every .distcp file must exist and hold the byte ranges its chunks claim."""
    need: Dict[str, Tuple[int, str]] = {}
    for idx, info in meta.storage_data.items():
        end = info.offset + info.length
        if end > need.get(info.relative_path, (0, ""))[0]:
            need[info.relative_path] = (end, idx.fqn)
    for rel, (end, fqn) in need.items():
        p = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(p):
            raise ValueError(f"{p}: missing (holds {fqn})")
        size = os.path.getsize(p)
        if size < end:
            raise ValueError(f"{p}: truncated: {size} bytes, its chunks (e.g. {fqn}) need {end}")


def _dcp_index(meta):
    """(logical key -> (stored key, layer or None), logical key -> shape, dtypes, stacked
    metadata) of the model tensors of a DCP checkpoint; stacked layer tensors are split into
    ``decoder.layers.<i>.<param>`` logical keys."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    where: Dict[str, Tuple[str, Optional[int]]] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    stacked, dtypes = {}, set()
    for key, md in meta.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata) or not _is_model_key(key):
            continue
        dtypes.add(md.properties.dtype)
        rest = key[len("decoder.layers."):] if key.startswith("decoder.layers.") else None
        if rest is not None and not rest.split(".")[0].isdigit():
            stacked[key] = md
            for i in range(md.size[0]):
                where[f"decoder.layers.{i}.{rest}"] = (key, i)
                shapes[f"decoder.layers.{i}.{rest}"] = tuple(md.size[1:])
        else:
            where[key] = (key, None)
            shapes[key] = tuple(md.size)
    return where, shapes, dtypes, stacked


class TorchDistSource(_KeyedSource):
    """A torch_dist (DCP) checkpoint directory, read slice by slice without Megatron."""

    def __init__(self, ckpt_dir: str):
        from torch.distributed.checkpoint import FileSystemReader

        where = ckpt_dir
        self.dir = ckpt_dir
        self.format = "torch_dist"
        try:
            self._reader = FileSystemReader(ckpt_dir)
            meta = self._reader.read_metadata()
        except Exception as e:  # noqa: BLE001  (pickle / IO errors of a corrupt .metadata)
            raise ValueError(f"{ckpt_dir}/.metadata: unreadable or truncated ({type(e).__name__}: "
                             f"{str(e)[:200]})") from e
        _verify_dcp_files(ckpt_dir, meta)
        self._meta = meta
        self._where, self._shapes, dtypes, stacked = _dcp_index(meta)
        self.storage_dtype = torch.bfloat16 if torch.bfloat16 in dtypes else (
            torch.float16 if torch.float16 in dtypes else torch.float32)
        args = _read_state_args(ckpt_dir)
        if args is None:
            args = self._common_args(ckpt_dir)
        if args is None:
            raise ValueError(f"{ckpt_dir}: no model config found (looked for {STATE} 'args' and "
                             f"'args' in common.pt); cannot infer the GQA shapes")
        n_stacked = {md.size[0] for md in stacked.values()}
        if len(n_stacked) > 1:
            raise ValueError(f"{where}: stacked layer tensors disagree on the layer count {sorted(n_stacked)}")
        self._setup(args, where)
        if n_stacked and n_stacked != {self.cfg.num_layers}:
            raise ValueError(f"{where}: stacked tensors hold {n_stacked.pop()} layers, args num_layers "
                             f"is {self.cfg.num_layers}")
        self.description = f"Megatron torch_dist {ckpt_dir}"

    @staticmethod
    def _common_args(ckpt_dir: str) -> Optional[dict]:
        p = os.path.join(ckpt_dir, "common.pt")
        if not os.path.isfile(p):
            return None
        common = _torch_load(p, mmap=False)
        if isinstance(common, dict) and common.get("args") is not None:
            return _namespace_to_dict(common["args"])
        return None

    def _read(self, keys: Sequence[str]) -> Dict[str, Tensor]:
        return _dcp_read(self._reader, self._meta, self._where, keys)


def _dcp_read(reader, meta, where, keys: Sequence[str]) -> Dict[str, Tensor]:
    """Read the logical ``keys`` (full tensors; one layer slice of a stacked tensor) from DCP."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    requests = {}
    out = {}
    for k in keys:
        stored, layer = where[k]
        md = meta.state_dict_metadata[stored]
        if layer is None:
            dest = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            offsets = (0,) * len(md.size)
            out[k] = dest
        else:
            dest = torch.empty((1, *md.size[1:]), dtype=md.properties.dtype)
            offsets = (layer,) + (0,) * (len(md.size) - 1)
            out[k] = dest[0]
        requests[k] = (stored, dest, ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.size()))
    # one slice per stored tensor per DCP load: group the requests
    while requests:
        batch, seen = {}, set()
        for k, r in list(requests.items()):
            if r[0] not in seen:
                seen.add(r[0])
                batch[k] = requests.pop(k)
        _load_state_dict({}, reader, planner=_SlicePlanner(batch), no_dist=True)
    return out


def _slice_planner_class():
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        """Reads one chunk (offsets, sizes) of each requested stored tensor into a given buffer."""

        def __init__(self, requests):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.requests = requests          # name -> (stored key, dest, ChunkStorageMetadata)
            self._dest = {stored: dest for stored, dest, _ in requests.values()}
            if len(self._dest) != len(requests):
                raise ValueError("one slice per stored tensor per read")

        def create_local_plan(self):
            items = []
            for name, (stored, dest, chunk) in self.requests.items():
                md = self.metadata.state_dict_metadata[stored]
                items += create_read_items_for_chunk_list(stored, md, [chunk])
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            dest = self._dest[read_item.dest_index.fqn]
            return narrow_tensor_by_index(dest, read_item.dest_offsets, read_item.lengths)

        def commit_tensor(self, read_item, tensor):
            pass

    return SlicePlanner


class _SlicePlannerProxy:
    _cls = None

    def __call__(self, requests):
        if _SlicePlannerProxy._cls is None:
            _SlicePlannerProxy._cls = _slice_planner_class()
        return _SlicePlannerProxy._cls(requests)


_SlicePlanner = _SlicePlannerProxy()


class LegacySource(_KeyedSource):
    """Legacy ``mp_rank_TT[_PPP]/model_optim_rng.pt`` shards of one iteration, any TP x PP."""

    def __init__(self, ckpt_dir: str):
        self.dir, self.format = ckpt_dir, "legacy"
        grid = {}
        for name in sorted(os.listdir(ckpt_dir)):
            m = re.fullmatch(r"mp_rank_(\d+)(?:_(\d+))?(_\d+)?", name)
            if not m:
                continue
            if m.group(3):
                raise ValueError(f"{ckpt_dir}/{name}: expert-parallel shards are not supported")
            grid[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(ckpt_dir, name, "model_optim_rng.pt")
        if not grid:
            raise ValueError(f"{ckpt_dir}: neither a torch_dist checkpoint (.metadata) nor legacy "
                             f"mp_rank_* shards")
        tp = 1 + max(t for t, _ in grid)
        pp = 1 + max(p for _, p in grid)
        for t in range(tp):
            for p in range(pp):
                if (t, p) not in grid:
                    raise ValueError(f"{ckpt_dir}: shard mp_rank_{t:02d}{f'_{p:03d}' if pp > 1 else ''} "
                                     f"is missing (grid TP {tp} x PP {pp})")
        self.tp, self.pp = tp, pp
        shards = {}
        args = None
        for (t, p), path in sorted(grid.items()):
            obj = _torch_load(path)
            if not isinstance(obj, dict):
                raise ValueError(f"{path}: not a Megatron checkpoint shard (a {type(obj).__name__})")
            if "model" not in obj:
                if any(k.startswith("model") and k[5:].isdigit() for k in obj):
                    raise ValueError(f"{path}: virtual-pipeline shards (model0, model1, ...) are not supported")
                raise ValueError(f"{path}: missing key 'model'")
            shards[(t, p)] = {k: v for k, v in obj["model"].items()
                              if isinstance(v, torch.Tensor) and _is_model_key(k)}
            if args is None and obj.get("args") is not None:
                args = _namespace_to_dict(obj["args"])
        state_args = _read_state_args(ckpt_dir)
        args = state_args if state_args is not None else args
        if args is None:
            raise ValueError(f"{ckpt_dir}: no model config found (no {STATE} and no 'args' in the shards)")
        for (t, p), sd in shards.items():
            if set(sd) != set(shards[(0, p)]):
                diff = sorted(set(sd) ^ set(shards[(0, p)]))
                raise ValueError(f"{grid[(t, p)]}: keys differ from TP rank 0 of the stage: {diff[:3]}")
        # pipeline offsets: layers per stage counted from the files
        offsets, total = [], 0
        for p in range(pp):
            idx = {int(k.split(".")[2]) for k in shards[(0, p)] if k.startswith("decoder.layers.")}
            if idx and idx != set(range(len(idx))):
                raise ValueError(f"{grid[(0, p)]}: local layer numbers {sorted(idx)} are not 0..n-1")
            offsets.append(total)
            total += len(idx)
        self._shards, self._grid, self._offsets = shards, grid, offsets
        self._loc: Dict[str, Tuple[int, str]] = {}   # logical key -> (stage, local key)
        self._shapes = {}
        dtypes = set()
        for p in range(pp):
            for k, v in shards[(0, p)].items():
                lk = k
                if k.startswith("decoder.layers."):
                    head, rest = k[len("decoder.layers."):].split(".", 1)
                    lk = f"decoder.layers.{int(head) + offsets[p]}.{rest}"
                elif k in self._loc and k != OUTPUT:
                    raise ValueError(f"{grid[(0, p)]}: {k} appears in two pipeline stages")
                if k == OUTPUT and k in self._loc:
                    continue   # keep the last stage's output layer
                self._loc[lk] = (p, k)
                self._shapes[lk] = self._merged_shape(k, [shards[(t, p)][k] for t in range(tp)])
                dtypes.add(v.dtype)
        self.storage_dtype = torch.bfloat16 if torch.bfloat16 in dtypes else (
            torch.float16 if torch.float16 in dtypes else torch.float32)
        self._setup(args, ckpt_dir)
        if total != self.cfg.num_layers:
            raise ValueError(f"{ckpt_dir}: the shards hold {total} layers, args num_layers is {self.cfg.num_layers}")
        self.description = f"Megatron legacy TP{tp} x PP{pp} {ckpt_dir}"

    @staticmethod
    def _tp_dim(key: str) -> Optional[int]:
        for suf, dim in _TP_DIM.items():
            if key.endswith(suf):
                return dim
        return None

    def _merged_shape(self, key, parts):
        dim = self._tp_dim(key)
        shape = list(parts[0].shape)
        if dim is not None and self.tp > 1:
            shape[dim] = sum(p.shape[dim] for p in parts)
        return tuple(shape)

    def _read(self, keys):
        out = {}
        for lk in keys:
            p, k = self._loc[lk]
            parts = [self._shards[(t, p)][k] for t in range(self.tp)]
            dim = self._tp_dim(k)
            if dim is None or self.tp == 1:
                for t in range(1, self.tp):
                    if not torch.equal(parts[t], parts[0]):
                        raise ValueError(f"{self._grid[(t, p)]}: replicated tensor {k} differs from TP rank 0")
                out[lk] = parts[0].clone()
            elif k.endswith("linear_fc1.weight"):   # per-rank [gate_r ; up_r] -> [gate ; up]
                halves = [x.chunk(2, 0) for x in parts]
                out[lk] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
            else:
                out[lk] = torch.cat(parts, dim)
        return out


def read_gqla_checkpoint(path: str, *, allow_mla: bool = False):
    """(reference ModelWeights float32, GQLAConfig, args) of a GQLA torch_dist checkpoint written by
    gqla-convert or gqla-pretrain (any saved TP: global tensors), read without Megatron.
    Uses the args' qk_layernorm / rotary_base / layernorm_epsilon (defaults: gqla-pretrain's).
    ``allow_mla``: also read gqla-pretrain ``--attention mla`` checkpoints (Megatron's
    MLASelfAttention), which are GQLA with one group per head (g = h_q): the same parameter
    names, ``linear_kv_up_proj`` holding one [K ; V] block per head."""
    from torch.distributed.checkpoint import FileSystemReader

    from gqla_megatron.config import GQLAConfig
    from gqla_megatron.megatron import adapters

    ckpt, _ = resolve_checkpoint_dir(path)
    args = _read_state_args(ckpt)
    if args is None:
        raise ValueError(f"{ckpt}: no {STATE} with 'args' (not a gqla-pretrain / gqla-convert checkpoint)")
    attention = args.get("attention", "gqla")
    if attention == "mla" and allow_mla:
        args = dict(args, num_query_groups=args["num_attention_heads"])
    elif attention != "gqla":
        raise ValueError(f"{ckpt}: a {attention!r} checkpoint, not GQLA" + (" or MLA" if allow_mla else ""))
    if not os.path.isfile(os.path.join(ckpt, ".metadata")):
        raise ValueError(f"{ckpt}: not a torch_dist checkpoint (no .metadata)")
    reader = FileSystemReader(ckpt)
    meta = reader.read_metadata()
    _verify_dcp_files(ckpt, meta)
    where, _shapes, _dt, _st = _dcp_index(meta)
    try:
        cfg = GQLAConfig.from_run_args(args)
    except KeyError as e:
        raise ValueError(f"{ckpt}/{STATE}: args has no {e}") from e
    sd = {k: v.float() for k, v in _dcp_read(reader, meta, where, list(where)).items()}
    backend = "local" if "decoder.layers.0.input_layernorm.weight" in sd else "te"
    try:
        mw = adapters.model_to_reference(sd, cfg, args["num_layers"], backend=backend,
                                         eps=cfg.layernorm_epsilon)
    except KeyError as e:
        raise ValueError(f"{ckpt}: {e}") from e
    return mw, cfg, args


def open_gqa_source(path: str) -> _KeyedSource:
    """Open a Megatron GQA checkpoint (root or iteration dir, torch_dist or legacy); validates
    shapes, keys, file sizes and the config before returning."""
    ckpt, _ = resolve_checkpoint_dir(path)
    if os.path.isfile(os.path.join(ckpt, ".metadata")):
        return TorchDistSource(ckpt)
    return LegacySource(ckpt)


def read_gqa_checkpoint(path: str) -> Tuple[GQAModelWeights, GQAModelConfig]:
    """Whole Megatron GQA checkpoint -> (GQAModelWeights float32 half-split, GQAModelConfig)."""
    src = open_gqa_source(path)
    return src.read_all(), src.cfg


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB, Linux ru_maxrss)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def _single_process_model_parallel():
    """TP = PP = 1 in one process (gloo FileStore group if none exists)."""
    import torch.distributed as dist

    import gqla_megatron.megatron  # noqa: F401  (CPU patches)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    created = False
    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mktemp(prefix="gqla_convert_pg_"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        created = True
    elif dist.get_world_size() != 1:
        raise ValueError("the checkpoint writer runs in one process (world size 1); run gqla-convert "
                         "without torchrun")
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def gqla_megatron_config(gcfg, *, num_layers: int, ffn_hidden_size: int, dtype: torch.dtype,
                         eps: float, **overrides):
    """Megatron GQLATransformerConfig of a GQLAConfig model with gqla-convert's fixed settings
    (``overrides``: further TransformerConfig fields, e.g. tensor_model_parallel_size)."""
    from gqla_megatron.training.models import transformer_config

    common = _megatron_common(num_layers, gcfg.hidden_size, ffn_hidden_size, gcfg.num_attention_heads,
                              dtype, eps)
    common.update(overrides)
    return transformer_config("gqla", common, gcfg.megatron_shape(), rotary_base=gcfg.rotary_base,
                              qk_layernorm=gcfg.qk_layernorm)


def _megatron_common(num_layers, D, F, H, dtype, eps):
    return dict(num_layers=num_layers, hidden_size=D, ffn_hidden_size=F, num_attention_heads=H,
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1, params_dtype=dtype,
                bf16=dtype == torch.bfloat16, gated_linear_unit=True,
                activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0,
                attention_dropout=0.0, layernorm_epsilon=eps, use_cpu_initialization=True,
                perform_initialization=False, gradient_accumulation_fusion=False,
                bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
                apply_rope_fusion=False, persist_layer_norm=False)


class GPTCheckpointWriter:
    """Target Megatron GPT model (TP = PP = 1, this process) filled tensor by tensor, saved as a
    gqla-pretrain torch_dist checkpoint. Use as a context manager (sets up / tears down the
    single-process model-parallel state)."""

    def __init__(self, attention: str, *, num_layers: int, hidden_size: int, ffn_hidden_size: int,
                 num_attention_heads: int, vocab_size: int, seq_length: int, dtype: torch.dtype,
                 eps: float, rotary_base: float, gqla=None, num_query_groups: Optional[int] = None,
                 head_dim: Optional[int] = None, backend: str = "local"):
        if attention not in ("gqla", "gqa"):
            raise ValueError(f"attention must be 'gqla' or 'gqa', got {attention!r}")
        self.attention, self.backend, self.dtype = attention, backend, dtype
        self.shape = dict(num_layers=num_layers, hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size,
                          num_attention_heads=num_attention_heads, vocab_size=vocab_size,
                          seq_length=seq_length)
        self.eps, self.rotary_base, self.gqla = eps, rotary_base, gqla
        self.num_query_groups, self.head_dim = num_query_groups, head_dim
        self._ctx = None
        self.model = None
        self._filled: set = set()

    def __enter__(self):
        self._ctx = _single_process_model_parallel()
        self._ctx.__enter__()
        try:
            self._build()
        except BaseException:
            self._ctx.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self.model = None
        return self._ctx.__exit__(*exc)

    def _build(self):
        from gqla_megatron.training.models import build_model, transformer_config

        s = self.shape
        if self.attention == "gqla":
            config = gqla_megatron_config(self.gqla, num_layers=s["num_layers"],
                                          ffn_hidden_size=s["ffn_hidden_size"], dtype=self.dtype, eps=self.eps)
        else:
            common = _megatron_common(s["num_layers"], s["hidden_size"], s["ffn_hidden_size"],
                                      s["num_attention_heads"], self.dtype, self.eps)
            config = transformer_config("gqa", common, dict(num_query_groups=self.num_query_groups,
                                                             qk_head_dim=self.head_dim))
        self.config = config
        self.model = build_model(self.attention, config, vocab_size=s["vocab_size"],
                                 seq_length=s["seq_length"], backend=self.backend)
        self._params = dict(self.model.named_parameters())

    def put(self, tensors: Dict[str, Tensor]) -> None:
        """Copy full tensors (Megatron parameter names at TP=1) into the model."""
        with torch.no_grad():
            for k, v in tensors.items():
                if k not in self._params:
                    raise KeyError(f"target model has no parameter {k!r}")
                p = self._params[k]
                if tuple(p.shape) != tuple(v.shape):
                    raise ValueError(f"{k}: tensor shape {tuple(v.shape)}, target parameter {tuple(p.shape)}")
                if k in self._filled:
                    raise ValueError(f"{k} written twice")
                p.copy_(v.detach().to(device=p.device, dtype=p.dtype))
                self._filled.add(k)

    def save(self, out_dir: str, *, args: dict, root_files: Optional[Dict[str, str]] = None,
             copy_files: Optional[Dict[str, str]] = None) -> str:
        """Write ``out_dir`` atomically (temp dir + rename). ``root_files``: name -> text written
        beside the checkpoint; ``copy_files``: name -> source path copied there."""
        from megatron.core import dist_checkpointing

        missing = sorted(set(self._params) - self._filled)
        if missing:
            raise ValueError(f"target parameters never written: {missing[:5]}")
        out_dir = os.path.abspath(out_dir)
        if os.path.exists(out_dir):
            raise ValueError(f"{out_dir} exists; refusing to overwrite")
        tmp = f"{out_dir}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        it_dir = os.path.join(tmp, "iter_0000000")
        os.makedirs(it_dir)
        try:
            dist_checkpointing.save({"model": self.model.sharded_state_dict()}, it_dir)
            state = {"iteration": 0, "world_size": 1, "model_only": True, "args": args}
            with open(os.path.join(it_dir, STATE), "w") as f:
                json.dump(state, f, indent=1, sort_keys=True, default=str)
            with open(os.path.join(tmp, LATEST), "w") as f:
                f.write("0")
            for name, text in (root_files or {}).items():
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(text)
            for name, src in (copy_files or {}).items():
                shutil.copyfile(src, os.path.join(tmp, name))
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out_dir


def save_gqla_model(mw, cfg, out_dir: str, *, seq_length: int, dtype: torch.dtype = torch.float32,
                    extra_args: Optional[dict] = None, root_files: Optional[Dict[str, str]] = None,
                    copy_files: Optional[Dict[str, str]] = None) -> str:
    """Reference GQLA ModelWeights + GQLAConfig -> a gqla-pretrain torch_dist checkpoint (model
    only, local-spec names, loadable at any TP/PP), written atomically."""
    from gqla_megatron.megatron import adapters

    if mw.mtp:
        raise ValueError("the model has MTP layers; writing them is not supported by this writer")
    if abs(mw.eps - cfg.layernorm_epsilon) > 1e-12:
        raise ValueError(f"Megatron uses one norm epsilon; the model's ({mw.eps}) and the latent norms' "
                         f"({cfg.layernorm_epsilon}) differ")
    L, vocab = len(mw.layers), mw.embedding.shape[0]
    F = mw.layers[0].W_fc2.shape[1]
    with GPTCheckpointWriter("gqla", num_layers=L, hidden_size=cfg.hidden_size, ffn_hidden_size=F,
                             num_attention_heads=cfg.num_attention_heads, vocab_size=vocab, seq_length=seq_length,
                             dtype=dtype, eps=mw.eps, rotary_base=cfg.rotary_base, gqla=cfg) as wr:
        wr.put({EMBEDDING: mw.embedding, FINAL_NORM: mw.final_norm, OUTPUT: mw.output})
        for i, lw in enumerate(mw.layers):
            wr.put(adapters.layer_from_reference(lw, f"decoder.layers.{i}.", cfg, backend="local"))
        args = dict(attention="gqla", num_layers=L, hidden_size=cfg.hidden_size, ffn_hidden_size=F,
                    num_attention_heads=cfg.num_attention_heads, vocab_size=vocab, seq_length=seq_length,
                    tensor_model_parallel_size=1, pipeline_model_parallel_size=1, transformer_impl="local",
                    bf16=dtype == torch.bfloat16, mtp_num_layers=None, rotary_base=cfg.rotary_base,
                    layernorm_epsilon=cfg.layernorm_epsilon, untie_embeddings_and_output_weights=True,
                    **cfg.megatron_shape(), qk_layernorm=cfg.qk_layernorm, **(extra_args or {}))
        return wr.save(out_dir, args=args, root_files=root_files, copy_files=copy_files)


def _base_args(attention: str, cfg: GQAModelConfig, *, seq_length: int, dtype: torch.dtype,
               tp: int, pp: int) -> dict:
    """gqla-pretrain style args of a written checkpoint (MODEL_FLAGS + layout + extras that
    the Megatron/serving side needs to rebuild the same math)."""
    return dict(attention=attention, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
                vocab_size=cfg.vocab_size, seq_length=seq_length, tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp, transformer_impl="local", bf16=dtype == torch.bfloat16,
                mtp_num_layers=None, rotary_base=cfg.rope_base, layernorm_epsilon=cfg.eps,
                untie_embeddings_and_output_weights=True)


def gqa_state_dict(w: GQAModelWeights, cfg: GQAModelConfig) -> Dict[str, Tensor]:
    """Megatron GQA GPT (local spec, TP=1, untied LM head) parameter dict of a GQA model."""
    sd = {EMBEDDING: w.embedding, FINAL_NORM: w.final_norm, OUTPUT: w.output}
    for l, lw in enumerate(w.layers):
        p = f"decoder.layers.{l}."
        sd[p + "input_layernorm.weight"] = lw.attn_norm
        sd[p + "self_attention.linear_qkv.weight"] = pack_qkv(lw.W_Q, lw.W_K, lw.W_V,
                                                               cfg.num_attention_heads, cfg.num_kv_heads)
        sd[p + "self_attention.linear_proj.weight"] = lw.W_O
        sd[p + "pre_mlp_layernorm.weight"] = lw.mlp_norm
        sd[p + "mlp.linear_fc1.weight"] = lw.W_fc1
        sd[p + "mlp.linear_fc2.weight"] = lw.W_fc2
    return sd


def save_gqa_checkpoint(w: GQAModelWeights, cfg: GQAModelConfig, out_dir: str, *,
                        dtype: torch.dtype = torch.float32, seq_length: Optional[int] = None,
                        extra_args: Optional[dict] = None, root_files=None, copy_files=None) -> str:
    """Write a GQA model as a gqla-pretrain ``--attention gqa`` torch_dist checkpoint (untied LM
    head: a tied source gets a copy of its embedding)."""
    seq = seq_length or cfg.context_length or 2048
    with GPTCheckpointWriter("gqa", num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                             ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
                             vocab_size=cfg.vocab_size, seq_length=seq, dtype=dtype, eps=cfg.eps,
                             rotary_base=cfg.rope_base, num_query_groups=cfg.num_kv_heads,
                             head_dim=cfg.head_dim) as wr:
        wr.put(gqa_state_dict(w, cfg))
        args = _base_args("gqa", cfg, seq_length=seq, dtype=dtype, tp=1, pp=1)
        args.update(num_query_groups=cfg.num_kv_heads, qk_head_dim=cfg.head_dim, kv_lora_rank=None,
                    q_lora_rank=None, qk_pos_emb_head_dim=None, v_head_dim=cfg.head_dim,
                    source_tied_embeddings=w.tied_output, **(extra_args or {}))
        return wr.save(out_dir, args=args, root_files=root_files, copy_files=copy_files)


# ----------------------------------------------------------------------------------------
# streamed TransGQLA conversion
# ----------------------------------------------------------------------------------------
@dataclass
class ConvertOptions:
    """Settings of one GQA -> GQLA conversion."""

    kv_lora_rank: Optional[int]
    """r: KV latent width; None = no PCA (2*g*d - d_r)."""
    rope_dim: int
    """d_r: shared RoPE key width (even, divides head_dim)."""
    freqfold: int
    """f: adjacent RoPE frequencies per RoRoPE bucket (multiple of head_dim/d_r, divides head_dim/2)."""
    balance_kv_ratio: float = 1.0
    """BKV-PCA key/value norm balance."""
    damping: float = 0.01
    """Eigen-decomposition damping (fraction of the mean diagonal)."""
    target_tp: int = 1
    """Target tensor-parallel size recorded in the args (must divide g and the heads)."""
    target_pp: int = 1
    """Target pipeline-parallel size recorded in the args (must divide the layers)."""
    dtype: Optional[torch.dtype] = None
    """Dtype of the written weights; None = the source's storage dtype."""
    device: str = "cpu"
    """Where calibration, covariances and eigendecompositions run ('cpu' or 'cuda')."""
    batch: int = 4
    """Calibration / evaluation windows per forward chunk."""


def validate_convert_options(cfg: GQAModelConfig, o: ConvertOptions) -> None:
    """ValueError naming the flag for every option that does not fit the source ``cfg``."""
    g, d, H, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_attention_heads, cfg.num_layers
    dr = o.rope_dim
    if isinstance(dr, bool) or not isinstance(dr, int) or dr <= 0 or dr % 2:
        raise ValueError(f"--qk-pos-emb-head-dim (d_r) must be a positive even integer, got {dr!r}")
    if dr > d or d % dr:
        raise ValueError(f"--qk-pos-emb-head-dim (d_r = {dr}) must divide the source head dim {d}")
    f = o.freqfold
    if isinstance(f, bool) or not isinstance(f, int) or f <= 0 or (d // 2) % f:
        raise ValueError(f"--freqfold ({f!r}) must be a positive divisor of head_dim/2 = {d // 2}")
    c = d // dr
    if f % c:
        raise ValueError(f"--freqfold ({f}) must be a multiple of head_dim/d_r = {c} (each bucket of "
                         f"f frequencies keeps f/c RoPE components)")
    width = 2 * g * d - dr
    r = o.kv_lora_rank
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= width):
        raise ValueError(f"--kv-lora-rank ({r!r}) must be in [1, 2*g*d - d_r = {width}] "
                         f"(g = {g}, d = {d}, d_r = {dr})")
    if not o.balance_kv_ratio > 0:
        raise ValueError(f"--balance-kv-ratio must be > 0, got {o.balance_kv_ratio!r}")
    if not isinstance(o.target_tp, int) or o.target_tp <= 0 or g % o.target_tp or H % o.target_tp:
        raise ValueError(f"--target-tensor-model-parallel-size ({o.target_tp}) must divide the KV groups "
                         f"g = {g} and the heads {H}")
    if not isinstance(o.target_pp, int) or o.target_pp <= 0 or L % o.target_pp:
        raise ValueError(f"--target-pipeline-model-parallel-size ({o.target_pp}) must divide the "
                         f"layers ({L})")
    if o.device != "cpu" and not (o.device.startswith("cuda") and torch.cuda.is_available()):
        raise ValueError(f"--device {o.device!r}: only 'cpu' or an available 'cuda' device")


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _source_block(h: Tensor, lw: GQALayerWeights, cfg: GQAModelConfig) -> Tensor:
    from gqla_megatron.conversion.gguf_import import gqa_attention

    h = h + gqa_attention(_rms(h, lw.attn_norm, cfg.eps), lw, cfg)
    gate, up = (_rms(h, lw.mlp_norm, cfg.eps) @ lw.W_fc1.T).chunk(2, -1)
    return h + (torch.nn.functional.silu(gate) * up) @ lw.W_fc2.T


def _chunked(fn: Callable[[Tensor], Tensor], h: Tensor, batch: int) -> Tensor:
    return torch.cat([fn(h[i:i + batch]) for i in range(0, h.shape[0], batch)], 0)


def _nll(h: Tensor, tokens: Tensor, final_norm: Tensor, output: Tensor, eps: float) -> Tuple[float, int]:
    """Summed next-token NLL of final hidden states h (N, S, D), one window at a time (the
    (S, vocab) logits of one window are the largest temporary)."""
    nll, count = 0.0, 0
    for i in range(h.shape[0]):
        logits = (_rms(h[i], final_norm, eps) @ output.T)[:-1].float()
        tok = tokens[i, 1:].to(logits.device)
        nll += torch.nn.functional.cross_entropy(logits, tok, reduction="sum").item()
        count += tok.numel()
    return nll, count


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, unit="layer")
    except ImportError:
        return iterable


def convert_checkpoint(source: GQASource, opts: ConvertOptions, out_dir: str, *,
                       calib_tokens: Tensor, eval_tokens: Optional[Tensor] = None,
                       seq_length: Optional[int] = None, source_info: Optional[dict] = None,
                       settings: Optional[dict] = None, copy_files: Optional[Dict[str, str]] = None,
                       progress: bool = False, logger: Optional[Callable[[dict], None]] = None,
                       stats: Optional[list] = None) -> dict:
    """Streamed TransGQLA of ``source`` into a gqla-pretrain GQLA checkpoint at ``out_dir``.

    ``calib_tokens`` (N, S): calibration windows; ``eval_tokens`` (N', S') optional held-out
    windows for perplexity before/after. ``stats``: precomputed per-layer calibration statistics
    (``transgqla.LayerStats``, e.g. Hessian-weighted ones from ``collect_attention_stats``, which
    needs the whole model in memory) used instead of the streamed second moments. Returns the report dict (also written as
    ``conversion_report.json`` / ``.md`` beside the checkpoint, with ``gqla_config.json``)."""
    from gqla_megatron import reference as ref
    from gqla_megatron import reference_model as rm
    from gqla_megatron.conversion import transgqla as tg
    from gqla_megatron.megatron import adapters

    cfg = source.cfg
    validate_convert_options(cfg, opts)
    if calib_tokens.ndim != 2 or calib_tokens.numel() == 0:
        raise ValueError(f"calibration tokens must be a non-empty (N, S) tensor, got {tuple(calib_tokens.shape)}")
    for name, t in (("calibration", calib_tokens), ("evaluation", eval_tokens)):
        if t is not None and (int(t.min()) < 0 or int(t.max()) >= cfg.vocab_size):
            raise ValueError(f"{name} token ids must be in [0, {cfg.vocab_size}), got [{int(t.min())}, {int(t.max())}]")
    if os.path.exists(out_dir):
        raise ValueError(f"--save {out_dir} exists; refusing to overwrite")
    dev = torch.device(opts.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    dtype = opts.dtype or source.storage_dtype
    gcfg = tg.gqla_config_for(cfg, kv_lora_rank=opts.kv_lora_rank, rope_dim=opts.rope_dim)
    t_start = time.perf_counter()
    times = {"read": 0.0, "calibrate": 0.0, "convert": 0.0, "evaluate": 0.0, "save": 0.0}
    seq = seq_length or cfg.context_length or max(2048, calib_tokens.shape[1])
    report_layers = []
    D = cfg.hidden_size
    with GPTCheckpointWriter("gqla", num_layers=cfg.num_layers, hidden_size=D,
                             ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
                             vocab_size=cfg.vocab_size, seq_length=seq, dtype=dtype, eps=cfg.eps,
                             rotary_base=cfg.rope_base, gqla=gcfg) as wr:
        t0 = time.perf_counter()
        emb = source.read_embedding()
        times["read"] += time.perf_counter() - t0
        wr.put({EMBEDDING: emb})
        h_cal = emb[calib_tokens].to(dev)
        h_src = h_dst = None
        if eval_tokens is not None:
            h_src = emb[eval_tokens].to(dev)
            h_dst = h_src.clone()
        emb_rows = emb
        del emb
        for l in _progress(range(cfg.num_layers), "TransGQLA", progress):
            t0 = time.perf_counter()
            lw_cpu = source.read_layer(l)
            lw = GQALayerWeights(**{k: getattr(lw_cpu, k).to(dev) for k in GQALayerWeights.__dataclass_fields__})
            times["read"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if stats is not None:
                xx, count = stats[l].xx.to(dev), stats[l].count
            else:
                xx = torch.zeros(D, D, dtype=torch.float64, device=dev)
                count = 0
                for i in range(0, h_cal.shape[0], opts.batch):
                    x = _rms(h_cal[i:i + opts.batch], lw.attn_norm, cfg.eps).reshape(-1, D).double()
                    xx += x.T @ x
                    count += x.shape[0]
                if l < cfg.num_layers - 1:
                    h_cal = _chunked(partial(_source_block, lw=lw, cfg=cfg), h_cal, opts.batch)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times["calibrate"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            with dev:
                aw, lr = tg.convert_layer(lw, cfg, xx / count, kv_lora_rank=opts.kv_lora_rank,
                                          rope_dim=opts.rope_dim, freqfold=opts.freqfold,
                                          balance_kv_ratio=opts.balance_kv_ratio, damping=opts.damping, layer=l)
            aw.check(gcfg)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times["convert"] += time.perf_counter() - t0
            report_layers.append(dict(layer=l, rope_energy=lr.rope_energy, kv_energy=lr.kv_energy, alpha=lr.alpha))
            new_lw = rm.LayerWeights(input_norm=lw.attn_norm, attn=aw.to(torch.float32),
                                     mlp_norm=lw.mlp_norm, W_fc1=lw.W_fc1, W_fc2=lw.W_fc2)
            if h_src is not None:
                t0 = time.perf_counter()
                h_src = _chunked(partial(_source_block, lw=lw, cfg=cfg), h_src, opts.batch)

                def dst_block(h, nl=new_lw):
                    h = h + ref.attention_expanded(ref.rms_norm(h, nl.input_norm, cfg.eps), nl.attn, gcfg)
                    return h + rm.mlp(h, nl, cfg.eps)

                h_dst = _chunked(dst_block, h_dst, opts.batch)
                times["evaluate"] += time.perf_counter() - t0
            wr.put({k: v.cpu() for k, v in adapters.layer_from_reference(
                new_lw, f"decoder.layers.{l}.", gcfg, backend="local").items()})
            del lw, lw_cpu, aw, new_lw, xx
        t0 = time.perf_counter()
        final_norm = source.read_final_norm()
        out = source.read_output()
        source.finish()
        times["read"] += time.perf_counter() - t0
        output = emb_rows if out is None else out
        wr.put({FINAL_NORM: final_norm, OUTPUT: output})
        ppl = {}
        if h_src is not None:
            t0 = time.perf_counter()
            fn, ow = final_norm.to(dev), output.to(dev)
            for name, h in (("source", h_src), ("converted", h_dst)):
                nll, n = _nll(h, eval_tokens, fn, ow, cfg.eps)
                ppl[name] = math.exp(nll / n)
            ppl["tokens"] = int(eval_tokens[:, 1:].numel())
            times["evaluate"] += time.perf_counter() - t0
            del fn, ow
        del h_cal, h_src, h_dst
        report = {
            "source": dict(source_info or {}, description=source.description,
                           config=dict(cfg.__dict__), tied_output=source.tied_output,
                           storage_dtype=str(source.storage_dtype).replace("torch.", "")),
            "gqla_config": gcfg.to_dict(),
            "settings": dict(settings or {}, kv_lora_rank=gcfg.kv_lora_rank, rope_dim=opts.rope_dim,
                             freqfold=opts.freqfold, balance_kv_ratio=opts.balance_kv_ratio,
                             damping=opts.damping, target_tensor_model_parallel_size=opts.target_tp,
                             target_pipeline_model_parallel_size=opts.target_pp,
                             dtype=str(dtype).replace("torch.", ""), device=opts.device,
                             calib_windows=int(calib_tokens.shape[0]), calib_seq_length=int(calib_tokens.shape[1])),
            "calib_tokens": int(calib_tokens.numel()),
            "cache_values_per_token_per_layer": {
                "source_gqa": 2 * cfg.num_kv_heads * cfg.head_dim,
                "gqla_absorb": gcfg.absorb_cache_elems_per_token,
                "gqla_gqa_path": gcfg.gqa_cache_elems_per_token()},
            "perplexity": ppl or None,
            "layers": report_layers,
        }
        args = _base_args("gqla", cfg, seq_length=seq, dtype=dtype, tp=opts.target_tp, pp=opts.target_pp)
        args.update(num_query_groups=gcfg.num_query_groups, kv_lora_rank=gcfg.kv_lora_rank,
                    q_lora_rank=None, qk_head_dim=gcfg.qk_head_dim, qk_pos_emb_head_dim=gcfg.qk_pos_emb_head_dim,
                    v_head_dim=gcfg.v_head_dim, qk_layernorm=False, saved_tensor_model_parallel_size=1,
                    saved_pipeline_model_parallel_size=1, converted_from=source.description)
        gqla_json = {"gqla_config": gcfg.to_dict(), "num_layers": cfg.num_layers,
                     "ffn_hidden_size": cfg.ffn_hidden_size, "vocab_size": cfg.vocab_size,
                     "seq_length": seq, "source": report["source"], "conversion": "TransGQLA"}
        t0 = time.perf_counter()
        times["save"] = 0.0
        # the report's time/memory figures are completed after the save (rewritten below)
        wr_out = wr.save(out_dir, args=args, copy_files=copy_files,
                         root_files={"gqla_config.json": json.dumps(gqla_json, indent=1, default=str)})
        times["save"] = time.perf_counter() - t0
    report["time_s"] = dict({k: round(v, 3) for k, v in times.items()},
                            total=round(time.perf_counter() - t_start, 3))
    report["peak_rss_mib"] = round(peak_rss_mb(), 1)
    if dev.type == "cuda":
        report["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    with open(os.path.join(wr_out, "conversion_report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(wr_out, "conversion_report.md"), "w") as f:
        f.write(report_markdown(report))
    if logger is not None:
        logger(report)
    return report


def report_markdown(rep: dict) -> str:
    """Human-readable conversion report."""
    s, c = rep["settings"], rep["cache_values_per_token_per_layer"]
    lines = ["# TransGQLA conversion report", "",
             f"Source: {rep['source'].get('description')}", "",
             f"Settings: r = {s['kv_lora_rank']}, d_r = {s['rope_dim']}, freqfold = {s['freqfold']}, "
             f"balance_kv_ratio = {s['balance_kv_ratio']}, damping = {s['damping']}, dtype {s['dtype']}, "
             f"device {s['device']}, target TP {s['target_tensor_model_parallel_size']} x PP "
             f"{s['target_pipeline_model_parallel_size']}; calibration {s['calib_windows']} x "
             f"{s['calib_seq_length']} tokens.", "",
             f"KV cache values per token per layer: source {c['source_gqa']} -> GQLA absorb "
             f"{c['gqla_absorb']} ({100 * c['gqla_absorb'] / c['source_gqa']:.1f} %).", ""]
    if rep.get("perplexity"):
        p = rep["perplexity"]
        lines += [f"Held-out perplexity ({p['tokens']} predicted tokens): source {p['source']:.4f}, "
                  f"converted {p['converted']:.4f}.", ""]
    if "time_s" in rep:
        lines += ["Time (s): " + ", ".join(f"{k} {v}" for k, v in rep["time_s"].items())
                  + f"; peak RSS {rep['peak_rss_mib']} MiB"
                  + (f"; CUDA max allocated {rep['cuda_max_allocated_mib']} MiB"
                     if "cuda_max_allocated_mib" in rep else ""), ""]
    lines += ["| layer | RoPE-key energy kept | KV PCA energy kept | alpha |", "|---|---|---|---|"]
    lines += [f"| {l['layer']} | {l['rope_energy']:.4f} | {l['kv_energy']:.4f} | {l['alpha']:.3f} |"
              for l in rep["layers"]]
    return "\n".join(lines) + "\n"
