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
* MTP speculative decoding (``speculative=True``, weights with MTP depths, greedy only): each
  step verifies s_q = 1 + k tokens (the last accepted token and k drafts) in ONE main-model
  decode call on the chosen path, accepts the longest prefix of drafts that equal the main
  model's greedy tokens, plus the main model's next token, and rolls the caches back by length
  only (rejected slots are overwritten later, never read). The tokens are exactly those of
  plain greedy decoding. Drafts come from the checkpoint's MTP depths (reference_model.py):
  depth m at position j reads the depth m-1 hidden at j and token t_{j+m}, with its own
  GQLA KV cache on the same path; entries built on a draft token are recomputed next step.
  Acceptance and tokens per step are in ``engine.stats`` and each ``GenerationResult``.
* CUDA graphs (``cuda_graphs=True``, CUDA only): the decode-step functions (main model at
  s_q = 1 or 1 + k, each MTP depth) are captured per batch bucket (powers of two up to
  max_batch) on static input buffers; the caches are allocated once per bucket and reused, so
  a replay reads and writes the same memory. On CPU the engine says so and runs eagerly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
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


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """The decode step's RMSNorm: torch's ``F.rms_norm`` (same ops and bits as
    ``reference.rms_norm`` in fp32 / fp64 on CPU, tested; low-precision inputs are reduced in
    fp32; one op in place of six, which torch may run as one fused kernel on CUDA)."""
    if weight is None:
        return x
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


def fuse_down(w: ref.GQLAWeights) -> tuple:
    """(weights whose W_DQ, W_DKV, W_KR are row views of one stacked matrix, (that matrix, its
    row counts)): a decode step runs the three down-projections of the same input as one GEMM
    (W_DQ absent without a query latent)."""
    names = [n for n in ("W_DQ", "W_DKV", "W_KR") if getattr(w, n) is not None]
    stacked = torch.cat([getattr(w, n) for n in names], 0).contiguous()
    sizes = [getattr(w, n).shape[0] for n in names]
    return replace(w, **dict(zip(names, stacked.split(sizes, 0)))), (stacked, sizes)


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
    return_logits: bool = True
    """Keep the (n_generated, vocab) logits of every request (off for long benchmarks)."""

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
    steps: int = 0
    """Decode steps this request took part in (after the prefill)."""
    accepted_drafts: int = 0
    """Speculative mode: MTP draft tokens accepted over those steps (k drafted per step)."""


def batch_bucket(batch: int, max_batch: int) -> int:
    """The CUDA-graph batch bucket of ``batch`` requests: the smallest power of two >= batch,
    capped at max_batch (so the buckets are 1, 2, 4, ... and max_batch)."""
    if not 1 <= batch <= max_batch:
        raise ValueError(f"batch must be in [1, max_batch={max_batch}], got {batch}")
    b = 1
    while b < batch:
        b *= 2
    return min(b, max_batch)


class StepGraphs:
    """Decode-step functions run on static input buffers, one entry per key (function, batch
    bucket, s_q). ``capture=True`` (CUDA): the first call warms up on a side stream and captures
    a CUDA graph, later calls copy the inputs into the static buffers and replay. A warm-up
    writes the same cache slots as the real call with the same values (a step's cache writes
    depend only on its inputs), so capturing leaves the caches as one eager call would.
    ``capture=False`` runs the same static-buffer bookkeeping eagerly (CPU tests)."""

    def __init__(self, capture: bool):
        self.capture = capture
        self.entries = {}

    def reset(self) -> None:
        """Forget every graph (call when the caches or weights they captured are replaced)."""
        self.entries.clear()

    def __call__(self, key, fn, *inputs):
        entry = self.entries.get(key)
        if entry is None:
            static = [x.clone() for x in inputs]
            graph = out = None
            if self.capture:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    fn(*static)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # a private memory pool per graph
                    out = fn(*static)
            entry = self.entries[key] = (graph, static, out)
        graph, static, out = entry
        for buf, x in zip(static, inputs):
            buf.copy_(x)
        if graph is None:
            return fn(*static)
        graph.replay()
        return tuple(o.clone() for o in out)


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
                 tp_group=None, speculative: bool = False, num_speculative_tokens: Optional[int] = None,
                 cuda_graphs: bool = False):
        from gqla_megatron import roofline

        if decode_path not in ("auto",) + PATHS:
            raise ValueError(f"decode_path must be 'auto', 'absorb' or 'gqa', got {decode_path!r}")
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch must be >= 1 and max_seq_len >= 2, got {max_batch}, {max_seq_len}")
        self.speculative, self.k = bool(speculative), 0
        if speculative:
            if not mw.mtp:
                raise ValueError("speculative=True needs MTP layers in the weights (train with "
                                 "--mtp-num-layers); this model has none")
            self.k = len(mw.mtp) if num_speculative_tokens is None else num_speculative_tokens
            if not 1 <= self.k <= len(mw.mtp):
                raise ValueError(f"num_speculative_tokens must be in [1, {len(mw.mtp)}] (the MTP depths), "
                                 f"got {num_speculative_tokens}")
        elif num_speculative_tokens is not None:
            raise ValueError("num_speculative_tokens needs speculative=True")
        self.device, self.dtype = torch.device(device), dtype
        self.full_cfg = cfg
        self.tp_group = tp_group
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        self.mw = mw.to(device=self.device, dtype=dtype)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        # speculative steps touch up to ~2k slots past the last accepted token
        self.capacity = max_seq_len + (2 * self.k + 2 if self.speculative else 0)
        self.vocab_size = self.mw.embedding.shape[0]
        spec = device_spec
        if spec is None:
            # a measured probe differs between ranks; every rank must choose the same path
            spec = [roofline.device_spec_for(self.device, matmul_n=256, copy_mib=8) if self.tp_rank == 0 else None]
            if self.tp > 1:
                dist.broadcast_object_list(spec, src=dist.get_global_rank(tp_group, 0), group=tp_group)
            spec = spec[0]
        self.device_spec = spec
        self.decision = roofline.choose_decode_path(
            cfg, spec, s_q=1 + self.k, batch=max_batch, context=max_seq_len, requested=decode_path,
            dtype_bytes=torch.finfo(dtype).bits // 8, tp=self.tp)
        self.cfg = cfg
        # decode steps run the three down-projections (W_DQ, W_DKV, W_KR) as one GEMM; the
        # engine's own layer objects get row views of the stacked weight (no second copy)
        mtp_layers = [m.layer for m in self.mw.mtp[:self.k]]
        self.down, self.down_mtp = [], []
        for layers, down in ((self.mw.layers, self.down), (mtp_layers, self.down_mtp)):
            for l in layers:
                l.attn, d = fuse_down(l.attn)
                down.append(d)
        self.local = [(cfg, l.attn) for l in self.mw.layers]
        self.local_mtp = [(cfg, l.attn) for l in mtp_layers]
        if self.tp > 1:
            self.local = [local_attention(l.attn, cfg, self.tp_rank, self.tp) for l in self.mw.layers]
            self.local_mtp = [local_attention(l.attn, cfg, self.tp_rank, self.tp) for l in mtp_layers]
            self.cfg = self.local[0][0]
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs = None
        if cuda_graphs:
            if self.device.type == "cuda":
                self._graphs = StepGraphs(capture=True)
            else:
                print(f"gqla engine: CUDA graphs need a CUDA device (this engine runs on {self.device}); "
                      f"decoding eagerly", file=sys.stderr)
                self.cuda_graphs = False
        self.caches, self.mtp_caches, self._cache_rows = None, [], 0
        self.stats: dict = {}
        self._backend_request = decode_backend
        self._set_path(self.decision.path)
        if verbose:
            print(self.decision.summary())
            if self.warmed:
                print("compiled at load: " + "; ".join(self.warmed))

    # ---- path and cache ---------------------------------------------------------------
    def _set_path(self, path: str) -> None:
        from gqla_megatron.roofline import path_problems

        problems = path_problems(self.full_cfg, path, self.tp)
        if problems:
            raise ValueError(f"the {path} path cannot run at TP={self.tp}: " + "; ".join(problems))
        choice = select_backend(path, self.cfg, self.device, self.dtype, self._backend_request)
        self.path, self.backend, self.rejected_backends = path, choice.backend, choice.rejected
        self.prepared = [self.backend.prepare(w, c) for c, w in self.local]
        self.prepared_mtp = [self.backend.prepare(w, c) for c, w in self.local_mtp]
        # kernels the backend compiles lazily are compiled now, not at the first decode step
        # that needs them. Query tokens per decode call: 1; under speculation 1 + k (main model)
        # and k + m (MTP depth m re-runs k + m positions), i.e. k + 1 .. 2k
        s_q = tuple(range(self.k + 1, 2 * self.k + 1)) if self.speculative else (1,)
        self.warmed = self.backend.warmup(self.cfg, self.device, self.dtype, max_batch=self.max_batch,
                                          capacity=self.capacity, s_q=s_q, len_dtype=torch.long)
        if self._graphs is not None:
            self._graphs.reset()

    def cache_bytes_per_token(self, path: Optional[str] = None) -> int:
        """KV bytes per token on THIS rank (all main layers; MTP layers excluded)."""
        return refm.cache_bytes_per_token(path or self.path, self.cfg, len(self.mw.layers),
                                          torch.finfo(self.dtype).bits // 8)

    def _reduce(self, y: Tensor) -> Tensor:
        if self.tp > 1:
            dist.all_reduce(y, group=self.tp_group)
        return y

    def _alloc_layers(self, B: int, n: int) -> list:
        c, T, kw = self.cfg, self.capacity, dict(device=self.device, dtype=self.dtype)
        if self.path == "absorb":
            return [{"c": torch.zeros(B, T, c.kv_lora_rank, **kw),
                     "k_rope": torch.zeros(B, T, c.qk_pos_emb_head_dim, **kw)} for _ in range(n)]
        G = c.num_query_groups
        return [{"k_nope": torch.zeros(B, T, G, c.qk_head_dim, **kw), "v": torch.zeros(B, T, G, c.v_head_dim, **kw),
                 "k_rope": torch.zeros(B, T, c.qk_pos_emb_head_dim, **kw)} for _ in range(n)]

    def _ensure_caches(self, B: int) -> None:
        """Caches for B rows: fresh per call without graphs; with graphs reused while the bucket
        (and path) stays the same, since the captured graphs hold their addresses."""
        if self._graphs is not None and self.caches is not None and self._cache_rows == B:
            return
        self.caches = self._alloc_layers(B, len(self.mw.layers))
        self.mtp_caches = self._alloc_layers(B, self.k)
        self._cache_rows = B
        if self._graphs is not None:
            self._graphs.reset()

    def _alloc(self, B: int) -> list:
        """Main-layer caches for B rows (kept for callers of the earlier API)."""
        return self._alloc_layers(B, len(self.mw.layers))

    def switch_path(self, path: str) -> None:
        """Convert the live caches (main and MTP) to ``path`` without re-prefill (see module docstring)."""
        if path == self.path:
            return
        if path not in PATHS:
            raise ValueError(f"decode path must be 'absorb' or 'gqa', got {path!r}")

        def convert(caches, local):
            new = []
            for cache, (lcfg, lw) in zip(caches, local):
                if path == "gqa":
                    # the expansion's K and V are views into one (B, T, G, N + V) product: copied
                    # out, so the caches have the layout _alloc_layers gives (the one the
                    # backend's warm-up compiled for and the kernels read best), and the product
                    # is freed layer by layer
                    g = ref.expand_cache(ref.LatentCache(cache["c"], cache["k_rope"]), lw, lcfg)
                    new.append({"k_nope": g.k_nope_BTGN.contiguous(), "v": g.v_BTGV.contiguous(),
                                "k_rope": g.k_rope_BTR})
                else:
                    # with TP each rank recovers the latent from ITS groups' K/V (same rank condition)
                    lat = ref.compress_cache(ref.GroupCache(cache["k_nope"], cache["v"], cache["k_rope"]),
                                             lw, lcfg)
                    new.append({"c": lat.c_BTC, "k_rope": lat.k_rope_BTR})
            return new

        new, new_mtp = convert(self.caches, self.local), convert(self.mtp_caches, self.local_mtp)
        self._set_path(path)
        self.caches, self.mtp_caches = new, new_mtp

    # ---- model steps ------------------------------------------------------------------
    def _prefill_layer(self, h: Tensor, lw: refm.LayerWeights, local, cache: dict, b: int) -> Tensor:
        """One layer over a whole prompt (1, L, D) at positions 0..L-1 in the EXPANDED form on
        either path: per-group K/V from the latent, then causal GQA attention with g KV heads
        through torch SDPA (``enable_gqa``; cuDNN / efficient kernels on GPU where they accept
        the shapes). The latent (absorb) or the per-group K/V (gqa) go into row b of ``cache``."""
        import torch.nn.functional as F

        lcfg, w = local
        L, G = h.shape[1], lcfg.num_query_groups
        pos = torch.arange(L, device=self.device)[None]
        x = ref.rms_norm(h, lw.input_norm, self.mw.eps)
        q_nope, q_rope = ref.project_queries(x, w, lcfg, pos)             # (1, L, H, d_n), (1, L, H, d_r)
        c, kr = ref.project_latent(x, w, lcfg, pos)                       # (1, L, r), (1, L, d_r)
        kn, v = ref.expand_latent(c, w, lcfg)                             # (1, L, G, d_n), (1, L, G, d_v)
        q = torch.cat([q_nope, q_rope], -1).transpose(1, 2)
        k = torch.cat([kn, kr[:, :, None].expand(-1, -1, G, -1)], -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True,
                                           scale=lcfg.softmax_scale, enable_gqa=True)  # (1, H, L, d_v)
        y = o.transpose(1, 2).reshape(1, L, -1) @ w.W_O.T
        cache["k_rope"][b, :L] = kr[0]
        if self.path == "absorb":
            cache["c"][b, :L] = c[0]
        else:
            cache["k_nope"][b, :L], cache["v"][b, :L] = kn[0], v[0]
        h = h + self._reduce(y)
        return h + refm.mlp(h, lw, self.mw.eps)

    def _prefill_hidden(self, b: int, prompt: Tensor) -> Tensor:
        """Prefill of one request into cache row b; the final-normed hidden (L, D)."""
        h = self.mw.embedding[prompt][None]
        for lw, local, cache in zip(self.mw.layers, self.local, self.caches):
            h = self._prefill_layer(h, lw, local, cache, b)
        return ref.rms_norm(h, self.mw.final_norm, self.mw.eps)[0]

    def _prefill_one(self, b: int, prompt: Tensor) -> Tensor:
        """Prefill of one request into cache row b; the last position's logits."""
        return self._prefill_hidden(b, prompt)[-1] @ self.mw.output.T

    def _step_inputs(self, lengths: Tensor, S: int) -> dict:
        """What every layer of one step shares: positions lengths[b] + s, the batch row index
        and the RoPE (cos, sin) of those positions (computed once per step, not per layer)."""
        pos = lengths[:, None] + torch.arange(S, device=self.device)
        cos, sin = ref.rope_angles(pos, self.cfg.qk_pos_emb_head_dim, self.cfg.rotary_base, self.dtype)
        return {"pos": pos, "rows": torch.arange(lengths.shape[0], device=self.device)[:, None],
                "cos": cos, "sin": sin, "lengths": lengths}

    def _layer_step(self, h: Tensor, lw: refm.LayerWeights, local, down, prep: dict, cache: dict,
                    step: dict) -> Tensor:
        """One layer for S new tokens per sequence at positions lengths[b] + s (B, S, D)."""
        cfg, w = local
        B, S, _ = h.shape
        pos, rows, eps = step["pos"], step["rows"], cfg.layernorm_epsilon
        x = rms_norm(h, lw.input_norm, self.mw.eps)
        W_down, sizes = down
        parts = (x @ W_down.T).split(sizes, dim=-1)
        cq_pre, (c_pre, kr_pre) = (parts[0], parts[1:]) if len(parts) == 3 else (None, parts)
        cq = x if cq_pre is None else rms_norm(cq_pre, w.q_norm, eps)
        q_nope, q_rope = ref.queries_from_latent(cq, w, cfg, step["cos"], step["sin"])
        c_new, kr_new = rms_norm(c_pre, w.kv_norm, eps), ref.rotate(kr_pre, step["cos"], step["sin"])
        cache["k_rope"][rows, pos] = kr_new
        if self.path == "absorb":
            cache["c"][rows, pos] = c_new
        else:
            kn, v = ref.expand_latent(c_new, w, cfg)
            cache["k_nope"][rows, pos], cache["v"][rows, pos] = kn, v
        o = self.backend.attend(prep, q_nope, q_rope, cache, step["lengths"], cfg)
        h = h + self._reduce(o.reshape(B, S, -1) @ w.W_O.T)
        return h + refm.mlp_from_normed(rms_norm(h, lw.mlp_norm, self.mw.eps), lw)

    def _main_step(self, tokens: Tensor, lengths: Tensor) -> tuple:
        """The main model on tokens (B, S) at positions lengths[b] + s: (logits (B, S, vocab),
        final-normed hidden (B, S, D))."""
        mw = self.mw
        h = mw.embedding[tokens]
        step = self._step_inputs(lengths, tokens.shape[1])
        for lw, local, down, prep, cache in zip(mw.layers, self.local, self.down, self.prepared, self.caches):
            h = self._layer_step(h, lw, local, down, prep, cache, step)
        h = rms_norm(h, mw.final_norm, mw.eps)
        return h @ mw.output.T, h

    def _mtp_step(self, depth: int, h_prev: Tensor, next_tokens: Tensor, lengths: Tensor) -> tuple:
        """MTP depth ``depth`` (1-based) on S positions per sequence starting at lengths[b]:
        (its final-normed output (B, S, D),)."""
        m = self.mw.mtp[depth - 1]
        x = refm.mtp_input(h_prev, next_tokens, m, self.mw)
        h = self._layer_step(x, m.layer, self.local_mtp[depth - 1], self.down_mtp[depth - 1],
                             self.prepared_mtp[depth - 1], self.mtp_caches[depth - 1],
                             self._step_inputs(lengths, next_tokens.shape[1]))
        return (rms_norm(h, m.final_norm, self.mw.eps),)

    def _run(self, key, fn, *inputs):
        if self._graphs is None:
            return fn(*inputs)
        return self._graphs((key, self.path) + tuple(x.shape for x in inputs), fn, *inputs)

    def _decode_step(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """One token per sequence at position ``lengths``; returns logits (B, vocab)."""
        return self._run("main", self._main_step, tokens[:, None], lengths)[0][:, 0]

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
        if self.speculative and params.temperature > 0:
            raise ValueError(f"speculative decoding is greedy only: temperature must be 0, got "
                             f"{params.temperature} (build the engine with speculative=False to sample)")
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
        rows = batch_bucket(B, self.max_batch) if self._graphs is not None else B
        self._ensure_caches(rows)
        if self.speculative:
            self._generate_speculative(prompts, valid, rows, params, results, switch_at, switch_to)
        else:
            self._generate_plain(prompts, valid, rows, params, results, switch_at, switch_to)
        return results

    def _generate_plain(self, prompts, valid, rows, params, results, switch_at, switch_to):
        B, dev = len(valid), self.device
        gen = torch.Generator(device=dev).manual_seed(params.seed)
        lengths = torch.zeros(rows, dtype=torch.long, device=dev)  # padding rows: length 0
        lengths[:B] = torch.tensor([len(prompts[i]) for i in valid], device=dev)
        first = torch.stack([self._prefill_one(b, torch.tensor(prompts[i], device=dev))
                             for b, i in enumerate(valid)])
        tok = torch.zeros(rows, dtype=torch.long, device=dev)
        tok[:B] = sample(first, params, gen)
        logits_all, tokens_all = [first], [tok[:B].clone()]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        stops = torch.tensor(list(params.stop_tokens) or [-1], device=dev)
        steps = 0
        for step in range(params.max_new_tokens - 1):
            done |= torch.isin(tokens_all[-1], stops)
            if bool(done.all()):
                break
            if switch_at is not None and step == switch_at:
                self.switch_path(switch_to)
            lg = self._decode_step(tok, lengths)[:B]
            lengths = lengths + 1
            steps += 1
            if params.return_logits:
                logits_all.append(lg)
            tok = tok.clone()
            tok[:B] = torch.where(done, tokens_all[-1], sample(lg, params, gen))
            tokens_all.append(tok[:B].clone())
        toks = torch.stack(tokens_all, 1)
        lgs = torch.stack(logits_all, 1) if params.return_logits else None
        stop_set = set(params.stop_tokens)
        for b, i in enumerate(valid):
            out = toks[b].tolist()
            n = len(out)
            for j, t in enumerate(out):
                if t in stop_set:
                    n = j + 1
                    break
            results[i].tokens = out[:n]
            results[i].logits = lgs[b, :n] if lgs is not None else None
            results[i].steps = n - 1
        n_gen = sum(len(results[i].tokens) - 1 for i in valid)
        self.stats = {"speculative": False, "decode_steps": steps, "tokens_per_step": 1.0 if n_gen else 0.0}

    # ---- benchmarking only --------------------------------------------------------------
    @torch.no_grad()
    def fill_random_context(self, batch: int, context: int, seed: int = 0) -> dict:
        """FOR BENCHMARKS ONLY: state as if ``batch`` requests had prefilled ``context`` tokens,
        with the caches (main and MTP) filled with random values instead of real K/V, so a few
        decode steps at a long context can be timed without prefilling it. The tokens produced
        from this state are meaningless; step times are what they would be. Returns the state
        that ``bench_step`` advances."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch must be in [1, max_batch={self.max_batch}], got {batch}")
        if not 1 <= context <= self.max_seq_len - 8:
            raise ValueError(f"context must be in [1, max_seq_len - 8 = {self.max_seq_len - 8}], got {context}")
        rows = batch_bucket(batch, self.max_batch) if self._graphs is not None else batch
        self._ensure_caches(rows)
        g = torch.Generator(device=self.device).manual_seed(seed)
        for cache in self.caches + self.mtp_caches:
            for t in cache.values():
                for b in range(rows):  # one row at a time bounds the temporary memory
                    t[b, :context].normal_(generator=g)
        if not self.speculative:
            return {"tokens": torch.randint(0, self.vocab_size, (rows,), device=self.device, generator=g),
                    "lengths": torch.full((rows,), context, dtype=torch.long, device=self.device)}
        st = self._spec_state(rows)
        st["tok"][:, :context + self.k + 1] = torch.randint(0, self.vocab_size, (rows, context + self.k + 1),
                                                            device=self.device, generator=g)
        for h in st["hist"]:
            h.normal_(generator=g)
        st["n"].fill_(context + 1)
        st["frozen"][:batch] = False
        return st

    @torch.no_grad()
    def bench_step(self, state: dict) -> Tensor:
        """FOR BENCHMARKS ONLY: one decode step from ``fill_random_context``'s state; returns the
        tokens emitted per row (1 each, or accepted + 1 with speculation) as a device tensor."""
        if not self.speculative:
            lg = self._decode_step(state["tokens"], state["lengths"])
            state["tokens"], state["lengths"] = lg.argmax(-1), state["lengths"] + 1
            return torch.ones_like(state["lengths"])
        _, a, _ = self._spec_step(state)
        return a + 1

    # ---- speculative decoding -----------------------------------------------------------
    def _spec_state(self, rows: int) -> dict:
        """Speculative bookkeeping for ``rows`` sequences: tok (rows, capacity) every accepted
        token with the current drafts after them; n (rows,) accepted tokens (the last one not
        yet run through the main model); hist[d] (rows, W, D) the last W outputs of depth d
        (d = 0: main final-normed hidden) by position % W; frozen rows (done or padding)."""
        D, W = self.full_cfg.hidden_size, 2 * self.k + 2
        kw = dict(device=self.device)
        return {"tok": torch.zeros(rows, self.capacity, dtype=torch.long, **kw),
                "n": torch.ones(rows, dtype=torch.long, **kw),
                "hist": [torch.zeros(rows, W, D, dtype=self.dtype, **kw) for _ in range(self.k)],
                "frozen": torch.ones(rows, dtype=torch.bool, **kw), "W": W}

    def _spec_prefill(self, st: dict, b: int, prompt: Tensor) -> Tensor:
        """Prefill row b: main model, its greedy next token, then MTP depths 1..k over the
        prompt (depth m at the last position reads depth m-1's draft). Returns the logits of
        the first generated token."""
        mw, L, W = self.mw, prompt.shape[0], st["W"]
        h = self._prefill_hidden(b, prompt)                     # (L, D)
        logits = h[-1] @ mw.output.T
        seq = torch.cat([prompt, logits.argmax()[None]])        # t_0 .. t_L
        st["tok"][b, :L + 1] = seq
        keep = torch.arange(max(0, L - W), L, device=self.device)
        st["hist"][0][b, keep % W] = h[keep]
        for m in range(1, self.k + 1):
            x = refm.mtp_input(h[None], seq[m:m + L][None], mw.mtp[m - 1], mw)
            out = self._prefill_layer(x, mw.mtp[m - 1].layer, self.local_mtp[m - 1], self.mtp_caches[m - 1], b)
            h = ref.rms_norm(out, mw.mtp[m - 1].final_norm, mw.eps)[0]
            seq = torch.cat([seq, (h[-1] @ mw.output.T).argmax()[None]])
            if m < self.k:
                st["hist"][m][b, keep % W] = h[keep]
        st["tok"][b, :seq.shape[0]] = seq
        st["n"][b], st["frozen"][b] = L + 1, False
        return logits

    def _spec_step(self, st: dict) -> tuple:
        """One verify-accept-draft step for every row; returns (y (rows, k+1) the main model's
        greedy tokens at the verified positions, a (rows,) accepted drafts, logits (rows, k+1, V)).
        Row b emits y[b, :a[b] + 1]. Frozen rows keep their state."""
        k, W, dev = self.k, st["W"], self.device
        tok, n, frozen, hist = st["tok"], st["n"], st["frozen"], st["hist"]
        R = n.shape[0]
        rows = torch.arange(R, device=dev)
        live = ~frozen
        ar = torch.arange(k + 1, device=dev)
        inp = tok.gather(1, (n - 1)[:, None] + ar)                        # last accepted + k drafts
        logits, hid = self._run("main", self._main_step, inp, n - 1)
        y = logits.argmax(-1)
        a = (inp[:, 1:] == y[:, :k]).long().cumprod(1).sum(1)
        a = torch.where(live, a, torch.zeros_like(a))
        n_new = torch.where(live, n + a + 1, n)
        tok[rows, n + a] = torch.where(live, y[rows, a], tok[rows, n + a])  # the main model's next token
        self._hist_write(hist[0], (n - 1)[:, None] + ar, hid, (ar[None] <= a[:, None]) & live[:, None], W)
        for m in range(1, k + 1):
            start = (n - m).clamp(min=0)                                   # depth m's committed length
            pos = start[:, None] + torch.arange(k + m, device=dev)
            valid = (pos <= (n_new - 2)[:, None]) & live[:, None]
            h_in = hist[m - 1][rows[:, None], pos % W]
            nxt = tok.gather(1, (pos + m).clamp(max=tok.shape[1] - 1))
            (out,) = self._run(("mtp", m), lambda h_, t_, l_, m=m: self._mtp_step(m, h_, t_, l_), h_in, nxt, start)
            last = (n_new - 2 - start).clamp(min=0, max=k + m - 1)
            draft = (out[rows, last] @ self.mw.output.T).argmax(-1)
            slot = (n_new - 1 + m).clamp(max=tok.shape[1] - 1)
            tok[rows, slot] = torch.where(live, draft, tok[rows, slot])
            if m < k:
                self._hist_write(hist[m], pos, out, valid, W)
        st["n"] = n_new
        return y, a, logits

    @staticmethod
    def _hist_write(buf: Tensor, pos: Tensor, val: Tensor, valid: Tensor, W: int) -> None:
        """buf[b, pos % W] = val where valid (no host sync; a row's positions span < W slots)."""
        rows = torch.arange(buf.shape[0], device=buf.device)[:, None]
        slots = pos.clamp(min=0) % W
        buf[rows, slots] = torch.where(valid[..., None], val, buf[rows, slots])

    def _generate_speculative(self, prompts, valid, rows, params, results, switch_at, switch_to):
        B, dev = len(valid), self.device
        st = self._spec_state(rows)
        first = [self._spec_prefill(st, b, torch.tensor(prompts[i], device=dev)) for b, i in enumerate(valid)]
        stop_set = set(params.stop_tokens)
        out_tok = [[int(st["tok"][b, len(prompts[i])])] for b, i in enumerate(valid)]
        out_lg = [[first[b]] for b in range(B)]
        done = [out_tok[b][0] in stop_set or params.max_new_tokens == 1 for b in range(B)]
        steps = accepted = emitted = 0
        step = 0
        while not all(done):
            if switch_at is not None and step == switch_at:
                self.switch_path(switch_to)
            y, a, logits = self._spec_step(st)
            step += 1
            y_l, a_l = y.tolist(), a.tolist()
            for b in range(B):
                if done[b]:
                    continue
                r = results[valid[b]]
                r.steps += 1
                r.accepted_drafts += a_l[b]
                steps, accepted, emitted = steps + 1, accepted + a_l[b], emitted + a_l[b] + 1
                for j in range(a_l[b] + 1):
                    out_tok[b].append(y_l[b][j])
                    if params.return_logits:
                        out_lg[b].append(logits[b, j])
                    if y_l[b][j] in stop_set or len(out_tok[b]) == params.max_new_tokens:
                        done[b] = True
                        break
                if done[b]:
                    st["frozen"][b] = True
        for b, i in enumerate(valid):
            results[i].tokens = out_tok[b]
            results[i].logits = torch.stack(out_lg[b]) if params.return_logits else None
        self.stats = {"speculative": True, "num_speculative_tokens": self.k, "decode_steps": step,
                      "row_steps": steps, "drafted": steps * self.k, "accepted": accepted,
                      "acceptance_rate": accepted / (steps * self.k) if steps else 0.0,
                      "tokens_per_step": emitted / steps if steps else 0.0}
