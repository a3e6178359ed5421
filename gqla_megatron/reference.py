r"""GQLA math reference: plain PyTorch, one device, no Megatron, no Transformer Engine.

This file is the single source of math truth of the project. Every fast, parallel or
converted path (the Megatron layer under TP/PP/SP, the TE/FP8 spec, decode kernels,
converter outputs) is tested against the functions here. It is written for clarity,
not speed; compute in float64 in tests to make identities exact to ~1e-12.

Symbols (GQLAConfig field in brackets)
---------------------------------------
    B   batch                            S   query tokens in this call (s_q when decoding)
    T   cached / key tokens              D   model width            [hidden_size]
    H   query heads h_q                  [num_attention_heads]
    G   KV groups g                      [num_query_groups]
    M   heads per group h_q/g            head i belongs to group i // M ("neighbor" grouping,
                                         the order of HF repeat_kv and of Megatron's GQA)
    C   KV latent width r                [kv_lora_rank]
    Q   query latent width r_q           [q_lora_rank]; None = one full W_Q
    N   content (non-RoPE) q/k dim d_n   [qk_head_dim]
    R   decoupled RoPE dim d_r           [qk_pos_emb_head_dim]
    V   value head dim d_v               [v_head_dim]

Tensor names carry their shape as a suffix: ``c_BTC`` is the latent of T tokens,
``q_nope_BSHN`` the content part of the queries, and so on.

Weights (``GQLAWeights``; Megatron names in brackets, mapped in megatron/adapters.py)
-------------------------------------------------------------------------------------
    W_DQ   (Q, D)          query down-projection           [linear_q_down_proj]   optional
    q_norm (Q,)            RMSNorm weight of the q latent  [q_layernorm]
    W_UQ   (H*(N+R), Q|D)  per-head query up-projection; rows of head i are [nope N | rope R]
                                                           [linear_q_up_proj | linear_q_proj]
    W_DKV  (C, D)          KV down-projection              [linear_kv_down_proj rows :C]
    kv_norm(C,)            RMSNorm weight of the latent    [kv_layernorm]
    W_KR   (R, D)          shared RoPE key projection      [linear_kv_down_proj rows C:]
    W_UKV  (G*(N+V), C)    per-GROUP up-projection; rows of group j are [W_UK^(j) (N) ; W_UV^(j) (V)]
                                                           [linear_kv_up_proj]
    W_O    (D, H*V)        output projection, column block i belongs to head i   [linear_proj]

GQLA is MLA (DeepSeek-V2/V3) with W_UKV indexed by group j instead of by head i. G = H is
MLA; G = 1 is a latent MQA.

Per token t at position p_t
---------------------------
    c_t      = RMSNorm(W_DKV x_t)                           (C)    the latent
    kR_t     = RoPE_{p_t}(W_KR x_t)                         (R)    ONE RoPE key for all heads
    cq_t     = RMSNorm(W_DQ x_t)   (or x_t without W_DQ)
    [qC_ti ; qR_ti] = W_UQ^(i) cq_t,  qR_ti <- RoPE_{p_t}(qR_ti)
    kC_tj    = W_UK^(j) c_t,   v_tj = W_UV^(j) c_t              per group j
    score    s_{i,t,tau} = sigma * (qC_ti . kC_{tau,j(i)} + qR_ti . kR_tau),  sigma = (N+R)^-1/2
    o_ti     = sum_tau softmax_tau(s) v_{tau,j(i)};     y_t = W_O [o_t1; ...; o_tH]

Three algebraically equal ways to evaluate it
---------------------------------------------
1. Expanded (training / prefill; ``attention_expanded``): materialise G K heads
   [kC_j ; kR] (N+R) and G V heads (V), run GQA attention with M query heads per KV head.
2. MQA-absorb decode (``decode_absorb``): cache [c ; kR] (C+R values per token). Fold W_UK into
   the query, qabs_ti = W_UK^(j(i))^T qC_ti (C); score = sigma (qabs . c + qR . kR); latent
   output olat_ti = sum p c (C); o_ti = W_UV^(j(i)) olat_ti. One latent "KV head" of width C+R
   shared by all H heads. The fold is done per group, never repeated per head.
3. GQA decode (``decode_gqa``): cache per-group kC (N), v (V) and the shared kR once
   (G(N+V) + R values per token); attend exactly as in 1.

The two caches convert into each other (``expand_cache``: exact; ``compress_cache``: the left
pseudo-inverse of W_UKV, exact when G(N+V) >= C and W_UKV has full column rank).

RoPE
----
DeepSeek's decoupled RoPE with the *interleaved* pair layout: coordinates (2k, 2k+1) of the
R-dim RoPE part form pair k and rotate by angle p * base^(-2k/R). Megatron-Core's MLA
de-interleaves before rotate-half and does not re-interleave; the dot products (and so every
attention output) are identical, only the stored RoPE key is permuted.

Numerics: functions compute in the dtype they are given (use float64 in identity tests) and
never mutate their inputs; decode functions return the new cache instead of writing in place.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor

from gqla_megatron.config import GQLAConfig

__all__ = [
    "GQLAWeights", "LatentCache", "GroupCache",
    "rms_norm", "apply_rope", "project_queries", "project_latent", "expand_latent",
    "attention_expanded", "decode_absorb", "decode_gqa", "expand_cache", "compress_cache",
    "mla_attention_per_head", "empty_latent_cache", "empty_group_cache",
]


# ----------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------
@dataclass
class GQLAWeights:
    """Plain tensors of one GQLA attention layer, with math names (shapes in module doc)."""

    W_UQ: Tensor
    W_DKV: Tensor
    W_KR: Tensor
    W_UKV: Tensor
    W_O: Tensor
    W_DQ: Optional[Tensor] = None
    q_norm: Optional[Tensor] = None
    kv_norm: Optional[Tensor] = None

    def W_UK(self, cfg: GQLAConfig) -> Tensor:
        """(G, N, C): the key up-projection of every group."""
        G, N, V = cfg.num_query_groups, cfg.qk_head_dim, cfg.v_head_dim
        return self.W_UKV.view(G, N + V, -1)[:, :N]

    def W_UV(self, cfg: GQLAConfig) -> Tensor:
        """(G, V, C): the value up-projection of every group."""
        G, N, V = cfg.num_query_groups, cfg.qk_head_dim, cfg.v_head_dim
        return self.W_UKV.view(G, N + V, -1)[:, N:]

    def to(self, *args, **kwargs) -> "GQLAWeights":
        return replace(self, **{f.name: (None if getattr(self, f.name) is None
                                         else getattr(self, f.name).to(*args, **kwargs))
                                for f in fields(self)})

    def check(self, cfg: GQLAConfig) -> None:
        """Raise ValueError naming the first tensor whose shape does not fit ``cfg``."""
        D, H, G, C = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_lora_rank
        N, R, V, Q = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim, cfg.q_lora_rank
        want = {
            "W_UQ": (H * (N + R), D if Q is None else Q), "W_DKV": (C, D), "W_KR": (R, D),
            "W_UKV": (G * (N + V), C), "W_O": (D, H * V),
            "W_DQ": None if Q is None else (Q, D),
            "q_norm": None if (Q is None or not cfg.qk_layernorm) else (Q,),
            "kv_norm": (C,) if cfg.qk_layernorm else None,
        }
        for name, shape in want.items():
            t = getattr(self, name)
            got = None if t is None else tuple(t.shape)
            if got != shape:
                raise ValueError(f"GQLAWeights.{name} has shape {got}, expected {shape} for {cfg}")

    @classmethod
    def random(cls, cfg: GQLAConfig, *, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float64, std: float = 0.02,
               distinct_groups: bool = True) -> "GQLAWeights":
        """Random weights (normal, ``std``), norms near 1. Groups differ unless told otherwise."""
        D, H, G, C = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_lora_rank
        N, R, V, Q = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim, cfg.q_lora_rank

        def n(*shape, s=std):
            return torch.randn(*shape, generator=generator, dtype=dtype) * s

        def norm_w(k):
            return 1.0 + n(k, s=0.1)

        W_UKV = n(G * (N + V), C, s=std * 5)
        if not distinct_groups:
            W_UKV = W_UKV.view(G, N + V, C)[:1].expand(G, N + V, C).reshape(G * (N + V), C).clone()
        return cls(
            W_DQ=None if Q is None else n(Q, D),
            q_norm=None if (Q is None or not cfg.qk_layernorm) else norm_w(Q),
            W_UQ=n(H * (N + R), D if Q is None else Q, s=std * 5),
            W_DKV=n(C, D), kv_norm=norm_w(C) if cfg.qk_layernorm else None,
            W_KR=n(R, D, s=std * 5), W_UKV=W_UKV, W_O=n(D, H * V),
        )


@dataclass
class LatentCache:
    """MQA-absorb cache: latent c (B, T, C) and rotated shared RoPE key kR (B, T, R)."""

    c_BTC: Tensor
    k_rope_BTR: Tensor

    @property
    def length(self) -> int:
        return self.c_BTC.shape[1]


@dataclass
class GroupCache:
    """GQA-path cache: per-group content keys (B, T, G, N), values (B, T, G, V) and the shared
    rotated RoPE key stored once per token (B, T, R)."""

    k_nope_BTGN: Tensor
    v_BTGV: Tensor
    k_rope_BTR: Tensor

    @property
    def length(self) -> int:
        return self.v_BTGV.shape[1]


def empty_latent_cache(cfg: GQLAConfig, batch: int, *, dtype=torch.float64, device=None) -> LatentCache:
    return LatentCache(torch.zeros(batch, 0, cfg.kv_lora_rank, dtype=dtype, device=device),
                       torch.zeros(batch, 0, cfg.qk_pos_emb_head_dim, dtype=dtype, device=device))


def empty_group_cache(cfg: GQLAConfig, batch: int, *, dtype=torch.float64, device=None) -> GroupCache:
    G = cfg.num_query_groups
    return GroupCache(torch.zeros(batch, 0, G, cfg.qk_head_dim, dtype=dtype, device=device),
                      torch.zeros(batch, 0, G, cfg.v_head_dim, dtype=dtype, device=device),
                      torch.zeros(batch, 0, cfg.qk_pos_emb_head_dim, dtype=dtype, device=device))


# ----------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight (identity if weight is None)."""
    if weight is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_angles(positions_S: Tensor, R: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin) of the interleaved-RoPE angles p * base^(-2k/R), k < R/2, computed in float64,
    cast to ``dtype`` and laid out for ``rotate``: cos2 = [c0, c0, c1, c1, ...] and
    sin2 = [-s0, s0, -s1, s1, ...], (1, S, R) for (S,) positions, (B, S, R) for (B, S)."""
    inv_freq = base ** (-torch.arange(0, R, 2, dtype=torch.float64, device=positions_S.device) / R)
    ang = positions_S.to(torch.float64)[..., None] * inv_freq
    if ang.ndim == 2:
        ang = ang[None]
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    return cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)


def rotate(x_R: Tensor, cos2: Tensor, sin2: Tensor) -> Tensor:
    """Interleaved RoPE rotation of the last dim of ``x`` (B, S, R) or (B, S, H, R) with the
    (cos2, sin2) of ``rope_angles``: pair k = coords (2k, 2k+1) goes to
    (x_2k c_k - x_2k+1 s_k, x_2k+1 c_k + x_2k s_k), i.e. x * cos2 + pair_swap(x) * sin2."""
    if x_R.ndim == 4:
        cos2, sin2 = cos2[:, :, None, :], sin2[:, :, None, :]      # broadcast over heads
    swapped = x_R.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)       # (x1, x0, x3, x2, ...)
    return x_R * cos2 + swapped * sin2


def apply_rope(x_R: Tensor, positions_S: Tensor, base: float) -> Tensor:
    """Interleaved RoPE on the last dim (R) of ``x``: pair k = coords (2k, 2k+1) rotates by
    angle p * base^(-2k/R). ``x`` is (B, S, R) or (B, S, H, R); ``positions_S`` is (S,) or (B, S)."""
    return rotate(x_R, *rope_angles(positions_S, x_R.shape[-1], base, x_R.dtype))


def _positions(start_pos, S: int, device) -> Tensor:
    """(S,) positions start..start+S-1, or (B, S) if ``start_pos`` is a (B,) tensor."""
    ar = torch.arange(S, device=device)
    if isinstance(start_pos, Tensor):
        return start_pos.to(device)[:, None] + ar
    return start_pos + ar


def project_queries(x_BSD: Tensor, w: GQLAWeights, cfg: GQLAConfig, positions) -> tuple[Tensor, Tensor]:
    """Queries of every head: content part qC (B, S, H, N) and rotated RoPE part qR (B, S, H, R)."""
    cos2, sin2 = rope_angles(positions, cfg.qk_pos_emb_head_dim, cfg.rotary_base, x_BSD.dtype)
    cq = x_BSD if w.W_DQ is None else rms_norm(x_BSD @ w.W_DQ.T, w.q_norm, cfg.layernorm_epsilon)
    return queries_from_latent(cq, w, cfg, cos2, sin2)


def queries_from_latent(cq_BSQ: Tensor, w: GQLAWeights, cfg: GQLAConfig, cos2: Tensor,
                        sin2: Tensor) -> tuple[Tensor, Tensor]:
    """``project_queries`` from the normalised query latent cq (the layer input x without a
    query latent) and the RoPE (cos2, sin2) of ``rope_angles``."""
    B, S, _ = cq_BSQ.shape
    H, N, R = cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim
    q_BSHX = (cq_BSQ @ w.W_UQ.T).view(B, S, H, N + R)
    q_nope_BSHN, q_rope_BSHR = q_BSHX[..., :N], q_BSHX[..., N:]
    return q_nope_BSHN, rotate(q_rope_BSHR, cos2, sin2)


def project_latent(x_BSD: Tensor, w: GQLAWeights, cfg: GQLAConfig, positions) -> tuple[Tensor, Tensor]:
    """Normalised latent c (B, S, C) and the rotated shared RoPE key kR (B, S, R)."""
    c_BSC = rms_norm(x_BSD @ w.W_DKV.T, w.kv_norm, cfg.layernorm_epsilon)
    return c_BSC, apply_rope(x_BSD @ w.W_KR.T, positions, cfg.rotary_base)


def expand_latent(c_BTC: Tensor, w: GQLAWeights, cfg: GQLAConfig) -> tuple[Tensor, Tensor]:
    """Per-group content keys kC (B, T, G, N) and values v (B, T, G, V) from the latent."""
    B, T, _ = c_BTC.shape
    G, N, V = cfg.num_query_groups, cfg.qk_head_dim, cfg.v_head_dim
    kv_BTGX = (c_BTC @ w.W_UKV.T).view(B, T, G, N + V)
    return kv_BTGX[..., :N], kv_BTGX[..., N:]


def _causal_mask(S: int, T: int, q_pos, k_pos_T: Tensor) -> Tensor:
    """Boolean (S, T) or (B, S, T) mask, True where query may attend (k_pos <= q_pos)."""
    return k_pos_T[..., None, :] <= q_pos[..., :, None]


def _attend_groups(q_nope_BSHN, q_rope_BSHR, k_nope_BTGN, k_rope_BTR, v_BTGV, allowed, scale, M):
    """Softmax attention with per-group K/V (shared RoPE key), output (B, S, H, V)."""
    B, S, H, _ = q_nope_BSHN.shape
    G = k_nope_BTGN.shape[2]
    qn = q_nope_BSHN.view(B, S, G, M, -1)
    qr = q_rope_BSHR.view(B, S, G, M, -1)
    scores_BGMST = (torch.einsum("bsgmn,btgn->bgmst", qn, k_nope_BTGN)
                    + torch.einsum("bsgmr,btr->bgmst", qr, k_rope_BTR)) * scale
    mask = allowed if allowed.ndim == 2 else allowed[:, None, None]
    scores_BGMST = scores_BGMST.masked_fill(~mask, float("-inf"))
    p_BGMST = torch.softmax(scores_BGMST, dim=-1)
    o_BSGMV = torch.einsum("bgmst,btgv->bsgmv", p_BGMST, v_BTGV)
    return o_BSGMV.reshape(B, S, H, -1)


def _output(o_BSHV: Tensor, w: GQLAWeights) -> Tensor:
    B, S = o_BSHV.shape[:2]
    return o_BSHV.reshape(B, S, -1) @ w.W_O.T


# ----------------------------------------------------------------------------------------
# 1. expanded form (training / prefill)
# ----------------------------------------------------------------------------------------
def attention_expanded(x_BSD: Tensor, w: GQLAWeights, cfg: GQLAConfig, start_pos=0) -> Tensor:
    """Causal GQLA self-attention over a whole sequence in the expanded (GQA) form.

    x_BSD: (B, S, D); positions are start_pos + arange(S) (``start_pos`` int or (B,) tensor).
    Returns y (B, S, D).
    """
    S = x_BSD.shape[1]
    pos = _positions(start_pos, S, x_BSD.device)
    q_nope, q_rope = project_queries(x_BSD, w, cfg, pos)
    c_BSC, k_rope_BSR = project_latent(x_BSD, w, cfg, pos)
    k_nope, v = expand_latent(c_BSC, w, cfg)
    allowed = _causal_mask(S, S, pos, pos)
    o = _attend_groups(q_nope, q_rope, k_nope, k_rope_BSR, v, allowed, cfg.softmax_scale,
                       cfg.heads_per_group)
    return _output(o, w)


# ----------------------------------------------------------------------------------------
# 2. MQA-absorb decode
# ----------------------------------------------------------------------------------------
def absorb_query(q_nope_BSHN: Tensor, W_UK_GNC: Tensor) -> Tensor:
    """Fold W_UK into the content queries, once per group: qabs[b,s,g,m,:] = W_UK^(g)^T
    qC[b,s,g*M+m,:]. Returns (B, S, G, M, C)."""
    B, S, H, _ = q_nope_BSHN.shape
    G = W_UK_GNC.shape[0]
    return torch.einsum("bsgmn,gnc->bsgmc", q_nope_BSHN.reshape(B, S, G, H // G, -1), W_UK_GNC)


def absorb_output(o_lat_BSGMC: Tensor, W_UV_GVC: Tensor) -> Tensor:
    """Apply W_UV per group to the attention output over the latent: (B, S, G, M, C) ->
    per-head values (B, S, H, V)."""
    B, S, G, M, _ = o_lat_BSGMC.shape
    return torch.einsum("bsgmc,gvc->bsgmv", o_lat_BSGMC, W_UV_GVC).reshape(B, S, G * M, -1)


def decode_absorb(x_BSD: Tensor, cache: LatentCache, w: GQLAWeights, cfg: GQLAConfig
                  ) -> tuple[Tensor, LatentCache]:
    """Decode S >= 1 new tokens (s_q = S, causal among them) on the MQA-absorb path.

    The new tokens sit at positions cache.length .. cache.length+S-1. Returns (y (B, S, D),
    the cache with the S new entries appended). Attention runs over ONE latent KV head of
    width C + R; W_UK is folded into the query and W_UV applied to the latent output, both
    once per group.
    """
    B, S, _ = x_BSD.shape
    T0 = cache.length
    G, M = cfg.num_query_groups, cfg.heads_per_group
    pos = _positions(T0, S, x_BSD.device)
    c_new, kr_new = project_latent(x_BSD, w, cfg, pos)
    new = LatentCache(torch.cat([cache.c_BTC, c_new], 1), torch.cat([cache.k_rope_BTR, kr_new], 1))
    q_nope_BSHN, q_rope_BSHR = project_queries(x_BSD, w, cfg, pos)
    q_abs_BSGMC = absorb_query(q_nope_BSHN, w.W_UK(cfg))
    q_rope_BSGMR = q_rope_BSHR.view(B, S, G, M, -1)
    scores = (torch.einsum("bsgmc,btc->bgmst", q_abs_BSGMC, new.c_BTC)
              + torch.einsum("bsgmr,btr->bgmst", q_rope_BSGMR, new.k_rope_BTR)) * cfg.softmax_scale
    allowed = _causal_mask(S, T0 + S, pos, torch.arange(T0 + S, device=x_BSD.device))
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    o_lat_BSGMC = torch.einsum("bgmst,btc->bsgmc", p, new.c_BTC)
    return _output(absorb_output(o_lat_BSGMC, w.W_UV(cfg)), w), new


# ----------------------------------------------------------------------------------------
# 3. GQA-path decode
# ----------------------------------------------------------------------------------------
def decode_gqa(x_BSD: Tensor, cache: GroupCache, w: GQLAWeights, cfg: GQLAConfig
               ) -> tuple[Tensor, GroupCache]:
    """Decode S >= 1 new tokens on the GQA path: per-group K (N) and V (V), RoPE key once."""
    S = x_BSD.shape[1]
    T0 = cache.length
    pos = _positions(T0, S, x_BSD.device)
    c_new, kr_new = project_latent(x_BSD, w, cfg, pos)
    kn_new, v_new = expand_latent(c_new, w, cfg)
    new = GroupCache(torch.cat([cache.k_nope_BTGN, kn_new], 1), torch.cat([cache.v_BTGV, v_new], 1),
                     torch.cat([cache.k_rope_BTR, kr_new], 1))
    q_nope, q_rope = project_queries(x_BSD, w, cfg, pos)
    allowed = _causal_mask(S, T0 + S, pos, torch.arange(T0 + S, device=x_BSD.device))
    o = _attend_groups(q_nope, q_rope, new.k_nope_BTGN, new.k_rope_BTR, new.v_BTGV, allowed,
                       cfg.softmax_scale, cfg.heads_per_group)
    return _output(o, w), new


# ----------------------------------------------------------------------------------------
# path switch on a live cache
# ----------------------------------------------------------------------------------------
def expand_cache(cache: LatentCache, w: GQLAWeights, cfg: GQLAConfig) -> GroupCache:
    """Latent cache -> GQA cache (exact): [kC_j ; v_j] = W_UKV c per token; kR copied."""
    k_nope, v = expand_latent(cache.c_BTC, w, cfg)
    return GroupCache(k_nope, v, cache.k_rope_BTR.clone())


def latent_pinv(w: GQLAWeights, cfg: GQLAConfig, rcond: float = 1e-10) -> Tensor:
    """Left pseudo-inverse of W_UKV, (C, G(N+V)), computed in float64.

    Raises ValueError when W_UKV cannot be (or is not) of full column rank C: then the latent
    is not recoverable from the GQA cache and the switch must re-prefill instead.
    """
    if not cfg.compress_is_exact:
        raise ValueError(
            f"GQA -> latent cache compression needs num_query_groups*(qk_head_dim+v_head_dim) >= "
            f"kv_lora_rank, got {cfg.num_query_groups}*({cfg.qk_head_dim}+{cfg.v_head_dim}) < "
            f"{cfg.kv_lora_rank}: W_UKV is rank-deficient, re-prefill instead")
    W = w.W_UKV.to(torch.float64)
    s = torch.linalg.svdvals(W)
    rank = int((s > rcond * s[0]).sum())
    if rank < cfg.kv_lora_rank:
        raise ValueError(f"W_UKV has rank {rank} < kv_lora_rank {cfg.kv_lora_rank}: the latent "
                         f"cannot be recovered from the GQA cache, re-prefill instead")
    return torch.linalg.pinv(W)


def compress_cache(cache: GroupCache, w: GQLAWeights, cfg: GQLAConfig,
                   pinv_CX: Optional[Tensor] = None) -> LatentCache:
    """GQA cache -> latent cache through the left pseudo-inverse of W_UKV (see latent_pinv)."""
    if pinv_CX is None:
        pinv_CX = latent_pinv(w, cfg)
    B, T = cache.v_BTGV.shape[:2]
    kv_BTX = torch.cat([cache.k_nope_BTGN, cache.v_BTGV], -1).reshape(B, T, -1)
    c_BTC = (kv_BTX.to(pinv_CX.dtype) @ pinv_CX.T).to(cache.v_BTGV.dtype)
    return LatentCache(c_BTC, cache.k_rope_BTR.clone())


# ----------------------------------------------------------------------------------------
# independent MLA formula (for the G = H check and the MLA-layout export)
# ----------------------------------------------------------------------------------------
def mla_attention_per_head(x_BSD: Tensor, w: GQLAWeights, W_UKV_heads: Tensor, cfg: GQLAConfig,
                           start_pos: int = 0) -> Tensor:
    """DeepSeek MLA written head by head, with a PER-HEAD up-projection ``W_UKV_heads``
    (H*(N+V), C) in place of w.W_UKV. Loops over heads on purpose: it shares no attention
    code with the grouped functions above, so it checks them independently."""
    B, S, _ = x_BSD.shape
    H, N, V = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    pos = _positions(start_pos, S, x_BSD.device)
    q_nope, q_rope = project_queries(x_BSD, w, cfg, pos)
    c, k_rope = project_latent(x_BSD, w, cfg, pos)
    blocks = W_UKV_heads.view(H, N + V, -1)
    causal = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).tril()
    outs = []
    for i in range(H):
        k_i = torch.cat([c @ blocks[i, :N].T, k_rope], -1)            # (B, S, N+R)
        v_i = c @ blocks[i, N:].T                                     # (B, S, V)
        q_i = torch.cat([q_nope[:, :, i], q_rope[:, :, i]], -1)       # (B, S, N+R)
        s = (q_i @ k_i.transpose(1, 2)) * cfg.softmax_scale
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        outs.append(p @ v_i)
    return torch.cat(outs, -1) @ w.W_O.T


def mla_layout_up_proj(w: GQLAWeights, cfg: GQLAConfig) -> Tensor:
    """W_UKV repeated per head (H*(N+V), C): the DeepSeek-MLA layout of a GQLA layer."""
    G, M = cfg.num_query_groups, cfg.heads_per_group
    blocks = w.W_UKV.view(G, 1, -1, w.W_UKV.shape[1]).expand(G, M, -1, -1)
    return blocks.reshape(-1, w.W_UKV.shape[1]).clone()
