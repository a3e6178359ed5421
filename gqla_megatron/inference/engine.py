"""GQLA decode engine (single process): prefill in the expanded form, decode on the chosen path.

    engine = GQLAEngine(model_weights, cfg, decode_path="auto", max_batch=8, max_seq_len=2048)
    results = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=32))

* the path is chosen ONCE at load: ``auto`` asks the roofline model (gqla_megatron.roofline)
  with the real shapes, batch and context; ``absorb`` / ``gqa`` force one. The decision (both
  predicted times) is kept in ``engine.decision``.
* caches are preallocated per layer: absorb -> latent c (B, T, r) + RoPE key (B, T, d_r);
  gqa -> K (B, T, g, d_n), V (B, T, g, d_v) + the RoPE key once (B, T, d_r).
* requests of different lengths decode together (per-sequence positions and masks); a bad
  request (empty, too long) gets an error in its result and does not stop the others.
* ``switch_path`` converts the live cache: absorb -> gqa by expansion (exact); gqa -> absorb
  by the left pseudo-inverse of W_UKV (exact when g(d_n+d_v) >= r, refused otherwise).
* tensor parallelism over a process group (``tp_group``): each rank holds h_q/TP contiguous
  query heads, the up-projections of the groups those heads use and its W_O columns; the
  attention output is summed over the group. gqa path: g/TP groups per rank, so each rank
  caches only its groups' K/V (zero redundancy; needs g % TP == 0) plus the shared RoPE key
  (d_r values per token, replicated on every rank). absorb path: any TP dividing h_q; every
  rank caches the full latent (replicated). Embeddings, norms and the MLP are replicated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from gqla_megatron import reference as ref
from gqla_megatron import reference_model as refm
from gqla_megatron.config import GQLAConfig
from gqla_megatron.inference.backends import select_backend


def local_attention(w: ref.GQLAWeights, cfg: GQLAConfig, rank: int, tp: int):
    """(local GQLAConfig, local GQLAWeights) of TP rank ``rank``: its h_q/tp contiguous heads,
    the up-projection blocks of the groups those heads use, its W_O columns; the latent and
    RoPE-key projections are replicated."""
    H, M = cfg.num_attention_heads, cfg.heads_per_group
    if H % tp:
        raise ValueError(f"TP={tp} must divide num_attention_heads ({H})")
    Hl = H // tp
    heads = range(rank * Hl, (rank + 1) * Hl)
    groups = sorted({h // M for h in heads})
    lcfg = GQLAConfig(**{**cfg.to_dict(), "num_attention_heads": Hl, "num_query_groups": len(groups)})
    N, R, V = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
    W_UQ = w.W_UQ.view(H, N + R, -1)[heads.start:heads.stop].reshape(Hl * (N + R), -1)
    W_UKV = w.W_UKV.view(cfg.num_query_groups, N + V, -1)[groups[0]:groups[-1] + 1].reshape(len(groups) * (N + V), -1)
    W_O = w.W_O.view(w.W_O.shape[0], H, V)[:, heads.start:heads.stop].reshape(w.W_O.shape[0], Hl * V)
    lw = ref.GQLAWeights(W_UQ=W_UQ.contiguous(), W_DKV=w.W_DKV, W_KR=w.W_KR, W_UKV=W_UKV.contiguous(),
                         W_O=W_O.contiguous(), W_DQ=w.W_DQ, q_norm=w.q_norm, kv_norm=w.kv_norm)
    lw.check(lcfg)
    return lcfg, lw

PATHS = ("absorb", "gqa")


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    """Tokens to generate per request (at most)."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    stop_tokens: Sequence[int] = ()
    """Generation of a request ends after it emits one of these."""
    seed: int = 0
    """Seed of the sampling generator."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    tokens: List[int] = field(default_factory=list)
    """Generated tokens (the prompt excluded)."""
    logits: Optional[Tensor] = None
    """(n_generated, vocab) logits of each generated position (for tests and scoring)."""
    error: Optional[str] = None
    """Why the request was rejected (then ``tokens`` is empty)."""


def sample(logits: Tensor, p: SamplingParams, gen: torch.Generator) -> Tensor:
    """Next tokens (B,) from logits (B, vocab)."""
    if p.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / p.temperature, -1)
    if p.top_p < 1:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen)[:, 0]


class GQLAEngine:
    def __init__(self, mw: refm.ModelWeights, cfg: GQLAConfig, *, decode_path: str = "auto",
                 max_batch: int = 8, max_seq_len: int = 2048, device="cpu", dtype=torch.float32,
                 decode_backend: str = "auto", device_spec=None, verbose: bool = False,
                 tp_group=None):
        from gqla_megatron import roofline

        if decode_path not in ("auto",) + PATHS:
            raise ValueError(f"decode_path must be 'auto', 'absorb' or 'gqa', got {decode_path!r}")
        self.device, self.dtype = torch.device(device), dtype
        self.full_cfg = cfg
        self.tp_group = tp_group
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        self.mw = mw.to(device=self.device, dtype=dtype)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.vocab_size = self.mw.embedding.shape[0]
        spec = device_spec
        if spec is None:
            # a measured probe differs between ranks; every rank must choose the same path
            spec = [roofline.device_spec_for(self.device, matmul_n=256, copy_mib=8) if self.tp_rank == 0 else None]
            if self.tp > 1:
                dist.broadcast_object_list(spec, src=dist.get_global_rank(tp_group, 0), group=tp_group)
            spec = spec[0]
        self.decision = roofline.choose_decode_path(
            cfg, spec, s_q=1, batch=max_batch, context=max_seq_len, requested=decode_path,
            dtype_bytes=torch.finfo(dtype).bits // 8, tp=self.tp)
        self.cfg = cfg
        self.local = [(cfg, l.attn) for l in self.mw.layers]
        if self.tp > 1:
            self.local = [local_attention(l.attn, cfg, self.tp_rank, self.tp) for l in self.mw.layers]
            self.cfg = self.local[0][0]
        self._backend_request = decode_backend
        self._set_path(self.decision.path)
        if verbose:
            print(self.decision.summary())

    # ---- path and cache ---------------------------------------------------------------
    def _set_path(self, path: str) -> None:
        from gqla_megatron.roofline import path_problems

        problems = path_problems(self.full_cfg, path, self.tp)
        if problems:
            raise ValueError(f"the {path} path cannot run at TP={self.tp}: " + "; ".join(problems))
        choice = select_backend(path, self.cfg, self.device, self.dtype, self._backend_request)
        self.path, self.backend, self.rejected_backends = path, choice.backend, choice.rejected
        self.prepared = [self.backend.prepare(w, c) for c, w in self.local]

    def cache_bytes_per_token(self, path: Optional[str] = None) -> int:
        """KV bytes per token on THIS rank (all layers)."""
        return refm.cache_bytes_per_token(path or self.path, self.cfg, len(self.mw.layers),
                                          torch.finfo(self.dtype).bits // 8)

    def _reduce(self, y: Tensor) -> Tensor:
        if self.tp > 1:
            dist.all_reduce(y, group=self.tp_group)
        return y

    def _alloc(self, B: int) -> list:
        c, T, kw = self.cfg, self.max_seq_len, dict(device=self.device, dtype=self.dtype)
        if self.path == "absorb":
            return [{"c": torch.zeros(B, T, c.kv_lora_rank, **kw),
                     "k_rope": torch.zeros(B, T, c.qk_pos_emb_head_dim, **kw)} for _ in self.mw.layers]
        G = c.num_query_groups
        return [{"k_nope": torch.zeros(B, T, G, c.qk_head_dim, **kw), "v": torch.zeros(B, T, G, c.v_head_dim, **kw),
                 "k_rope": torch.zeros(B, T, c.qk_pos_emb_head_dim, **kw)} for _ in self.mw.layers]

    def switch_path(self, path: str) -> None:
        """Convert the live caches to ``path`` without re-prefill (see module docstring)."""
        if path == self.path:
            return
        if path not in PATHS:
            raise ValueError(f"decode path must be 'absorb' or 'gqa', got {path!r}")
        new = []
        for cache, (lcfg, lw) in zip(self.caches, self.local):
            if path == "gqa":
                g = ref.expand_cache(ref.LatentCache(cache["c"], cache["k_rope"]), lw, lcfg)
                new.append({"k_nope": g.k_nope_BTGN, "v": g.v_BTGV, "k_rope": g.k_rope_BTR})
            else:
                # with TP each rank recovers the latent from ITS groups' K/V (same rank condition)
                lat = ref.compress_cache(ref.GroupCache(cache["k_nope"], cache["v"], cache["k_rope"]),
                                         lw, lcfg)
                new.append({"c": lat.c_BTC, "k_rope": lat.k_rope_BTR})
        self._set_path(path)
        self.caches = new

    # ---- model steps ------------------------------------------------------------------
    def _prefill_one(self, b: int, prompt: Tensor) -> Tensor:
        """Prefill of one request into cache row b (the whole prompt at once, causal, through the
        reference decode functions on this rank's heads); returns the last position's logits."""
        mw = self.mw
        step = ref.decode_absorb if self.path == "absorb" else ref.decode_gqa
        h = mw.embedding[prompt][None]
        caches = []
        for lw, (lcfg, w) in zip(mw.layers, self.local):
            empty = (ref.empty_latent_cache if self.path == "absorb" else ref.empty_group_cache)(
                lcfg, 1, dtype=self.dtype, device=self.device)
            y, c = step(ref.rms_norm(h, lw.input_norm, mw.eps), empty, w, lcfg)
            caches.append(c)
            h = h + self._reduce(y)
            h = h + refm.mlp(h, lw, mw.eps)
        logits = ref.rms_norm(h, mw.final_norm, mw.eps) @ mw.output.T
        L = prompt.shape[0]
        for row, c in zip(self.caches, caches):
            if self.path == "absorb":
                row["c"][b, :L], row["k_rope"][b, :L] = c.c_BTC[0], c.k_rope_BTR[0]
            else:
                row["k_nope"][b, :L], row["v"][b, :L], row["k_rope"][b, :L] = c.k_nope_BTGN[0], c.v_BTGV[0], c.k_rope_BTR[0]
        return logits[0, -1]

    def _decode_step(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """One token per sequence at position ``lengths``; returns logits (B, vocab)."""
        mw = self.mw
        B = tokens.shape[0]
        rows = torch.arange(B, device=self.device)
        pos = lengths[:, None]
        h = mw.embedding[tokens][:, None]                                  # (B, 1, D)
        for lw, (cfg, w), prep, cache in zip(mw.layers, self.local, self.prepared, self.caches):
            x = ref.rms_norm(h, lw.input_norm, mw.eps)
            q_nope, q_rope = ref.project_queries(x, w, cfg, pos)
            c_new, kr_new = ref.project_latent(x, w, cfg, pos)
            cache["k_rope"][rows, lengths] = kr_new[:, 0]
            if self.path == "absorb":
                cache["c"][rows, lengths] = c_new[:, 0]
            else:
                kn, v = ref.expand_latent(c_new, w, cfg)
                cache["k_nope"][rows, lengths], cache["v"][rows, lengths] = kn[:, 0], v[:, 0]
            o = self.backend.attend(prep, q_nope, q_rope, cache, lengths, cfg)
            h = h + self._reduce(o.reshape(B, 1, -1) @ w.W_O.T)
            h = h + refm.mlp(h, lw, mw.eps)
        return (ref.rms_norm(h, mw.final_norm, mw.eps) @ mw.output.T)[:, 0]

    # ---- public -----------------------------------------------------------------------
    def validate_request(self, prompt: Sequence[int], max_new: int) -> Optional[str]:
        if len(prompt) == 0:
            return "empty prompt"
        if len(prompt) + max_new > self.max_seq_len:
            return (f"prompt length {len(prompt)} + max_new_tokens {max_new} exceeds the maximum "
                    f"context {self.max_seq_len}")
        bad = [t for t in prompt if not 0 <= int(t) < self.vocab_size]
        if bad:
            return f"token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})"
        return None

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams(),
                 *, switch_at: Optional[int] = None, switch_to: Optional[str] = None) -> List[GenerationResult]:
        """Generate for a batch of prompts of any lengths (<= max_batch valid requests).
        ``switch_at``/``switch_to``: convert the live cache to the other path after that many
        decode steps (tests the path switch)."""
        results = [GenerationResult() for _ in prompts]
        valid = []
        for i, p in enumerate(prompts):
            err = self.validate_request(p, params.max_new_tokens)
            if err:
                results[i].error = err
            else:
                valid.append(i)
        if len(valid) > self.max_batch:
            raise ValueError(f"{len(valid)} valid requests exceed max_batch {self.max_batch}")
        if not valid:
            return results
        B = len(valid)
        self.caches = self._alloc(B)
        gen = torch.Generator(device=self.device).manual_seed(params.seed)
        lengths = torch.tensor([len(prompts[i]) for i in valid], device=self.device)
        first = torch.stack([self._prefill_one(b, torch.tensor(prompts[i], device=self.device))
                             for b, i in enumerate(valid)])
        logits_all, tokens_all = [first], [sample(first, params, gen)]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        stops = torch.tensor(list(params.stop_tokens) or [-1], device=self.device)
        for step in range(params.max_new_tokens - 1):
            done |= torch.isin(tokens_all[-1], stops)
            if bool(done.all()):
                break
            if switch_at is not None and step == switch_at:
                self.switch_path(switch_to)
            lg = self._decode_step(tokens_all[-1], lengths)
            lengths = lengths + 1
            logits_all.append(lg)
            tokens_all.append(torch.where(done, tokens_all[-1], sample(lg, params, gen)))
        toks, lgs = torch.stack(tokens_all, 1), torch.stack(logits_all, 1)
        stop_set = set(params.stop_tokens)
        for b, i in enumerate(valid):
            out = toks[b].tolist()
            n = len(out)
            for j, t in enumerate(out):
                if t in stop_set:
                    n = j + 1
                    break
            results[i].tokens, results[i].logits = out[:n], lgs[b, :n]
        return results
