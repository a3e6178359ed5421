r"""MLA -> GQLA: share the K/V up-projections of a DeepSeek-style MLA model within g head groups.

Input: reference weights (``reference_model.ModelWeights`` + ``GQLAConfig``) of an MLA model,
i.e. ``num_query_groups == num_attention_heads`` (one K/V up-projection block per head;
DeepSeek-V2/V3). A GQLA source with fewer groups is accepted too: its blocks are first
repeated per head (``reference.mla_layout_up_proj``), so it can be regrouped to fewer groups.
Output: GQLA reference weights with ``num_query_groups = G`` and per-group up-projections of
``qk_head_dim = d_n'`` key rows and ``v_head_dim = d_v'`` value rows. W_DQ, the norms, W_DKV,
W_KR, the MLPs and the embeddings are untouched; the KV latent (what the absorb path caches)
is unchanged.

Symbols: H heads, G target groups, M = H/G heads per group, C latent width, N / V the source
key / value head dims, R the RoPE dim, A_K^h (N x C) and A_V^h (V x C) the source up-projection
of head h, c the normalised latent (after kv_norm).

Calibration (``collect_latent_stats``)
--------------------------------------
The source model (``reference_model``) is run on calibration tokens and, per layer, the first
and second moments of the latent c are accumulated in float64. Every K/V covariance the
algorithm needs is A Sigma_c A^T for a stack A of up-projection rows, so the per-head K/V are
never materialised. Keys use the CENTRED latent covariance: adding one vector to every key
adds a per-query constant to the scores, which the softmax ignores, so only the key's
variation around its mean has to survive. Values use the UNCENTRED second moment: the mean
value reaches the output (there is no bias to restore it).

Optional Hessian weighting (``hessian_weighting=True``): per-token weights from the empirical
Fisher of the NLL. With zero-valued "tap" tensors added to the per-group keys k (B,S,G,N) and
values v (B,S,G,V) of every layer, one autograd backward of the summed next-token NLL gives
g^K_t = dNLL/dk_t and g^V_t = dNLL/dv_t for every calibration token t. The key statistics are
weighted by w^K_t = ||g^K_t||^2 and the value statistics by w^V_t = ||g^V_t||^2, each
normalised to mean 1 over the layer's tokens: the diagonal (per-token, isotropic) Fisher
approximation of the Hessian of the NLL with respect to the token's K/V activations, the OBS
argument that tokens whose K/V the loss is sensitive to should be reconstructed better. (The
official GQLA code uses the teacher NLL of the next token as the weight instead, a cheaper
proxy.) The last position of a sequence gets weight 0 automatically (nothing in the loss reads
its K/V other than its own unlabelled query).

Grouping
--------
- ``"neighbor"``: group j = heads jM .. jM+M-1 (HF repeat_kv order).
- ``"similarity"``: Sim[h, h'] = w_k ||A_K^h S_K A_K^h'^T||_* / sqrt(tr(A_K^h S_K A_K^h^T)
  tr(A_K^h' S_K A_K^h'^T)) + w_v (the same for V), the nuclear norm of the activation-weighted
  cross-covariance of the two heads' keys (values), normalised: 1 for heads whose K (V) span
  the same subspace with matching energy, near 0 for unrelated heads. Groups are formed
  greedily and balanced ("seed and grow"): take the most similar pair of unassigned heads as a
  seed, then add the unassigned head with the largest summed similarity to the members until
  the group has M heads; repeat (ties go to the lowest index; the last M heads form the last
  group). The head permutation is absorbed exactly into the query rows and the W_O columns.
- an explicit partition (a list of G lists of M head indices).

Per-group PCA and absorption (exact at full rank)
-------------------------------------------------
For group j with members h_1..h_M (in that order): the stacked key up-projection
A = [A_K^h_1; ...; A_K^h_M] (MN x C) and Sigma = A (S_K + delta I) A^T with S_K the (weighted,
centred) latent covariance and delta = ``damping`` * mean diag(S_K) (float64). U = the top d_n'
eigenvectors of Sigma (MN x d_n'). The new group key up-projection is W_UK^(j) = U^T A
(d_n' x C) and the slot of member i is S_i = U[iN:(i+1)N] (N x d_n'), so
k_{h_i} ~ S_i W_UK^(j) c (the rank-d_n' reconstruction). The residual goes into the query: the
content rows of head h_i's query become S_i^T W_UQ,nope^{h_i}, so
q'.k' = q^T S_i U^T A_i c = q^T (U U^T A c)_i. Values alike with T_i and W_O: the W_O column
block of head h_i becomes W_O^{h_i} T_i. When d_n' >= rank(A) (e.g. d_n' = MN) U U^T A = A
and the layer is exact for every input (the damping keeps S_K + delta I positive definite, so
the PCA sees all of col(A), not only the calibration directions).
Softmax scale: GQLA uses (d_n' + R)^-1/2, so all query rows (content and RoPE) are scaled by
sqrt((d_n' + R) / (N + R)) to keep every score unchanged.

Retained energy (report): per group, tr(U^T A S A^T U) / tr(A S A^T) with the undamped
(weighted) latent statistics, for K and for V.

CLI wiring (``gqla-convert mla-to-gqla``, owned by cli.py): load the MLA source as ModelWeights +
GQLAConfig (a Megatron MLA checkpoint through megatron_io, or ``hf.load_hf_gqla``), tokenize the
calibration text into (n, S) windows (``textdata``), then::

    mw2, cfg2, report = convert_mla_model(mw, cfg, num_query_groups=G, calib_tokens=windows,
                                          grouping="neighbor"|"similarity",
                                          qk_head_dim=..., v_head_dim=...,
                                          hessian_weighting=bool, damping=0.01)
    print(report.summary())   # and report.to_dict() into the conversion report JSON

Flags: --groups G --grouping {neighbor,similarity} --qk-head-dim --v-head-dim --hessian
--damping --calib-samples --calib-seq-len.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from gqla_megatron import reference as ref
from gqla_megatron import reference_model as rm
from gqla_megatron.config import GQLAConfig
from gqla_megatron.conversion.transgqla import nll_tap_grads

__all__ = ["Moment", "LatentStats", "MLALayerReport", "MLAConversionReport",
           "collect_latent_stats", "per_head_up_proj", "group_heads", "head_similarity",
           "convert_mla_layer", "convert_mla_model", "GROUPINGS"]

F64 = torch.float64
GROUPINGS = ("neighbor", "similarity")


# ----------------------------------------------------------------------------------------
# calibration statistics
# ----------------------------------------------------------------------------------------
@dataclass
class Moment:
    """Weighted first and second moments of the latent c of one layer (float64)."""

    cc: Tensor
    """(C, C) sum_t w_t c_t c_t^T."""
    c: Tensor
    """(C,) sum_t w_t c_t."""
    weight: float
    """sum_t w_t (the token count when unweighted)."""

    def second(self) -> Tensor:
        """(C, C) uncentred second moment."""
        if not self.weight > 0:
            raise ValueError("calibration statistics are empty (total weight 0)")
        return self.cc / self.weight

    def covariance(self) -> Tensor:
        """(C, C) centred covariance."""
        mu = self.c / self.weight
        return self.second() - torch.outer(mu, mu)


@dataclass
class LatentStats:
    """Calibration statistics of one layer: moments for the key PCA and for the value PCA
    (identical unless Hessian-weighted)."""

    k: Moment
    """Moments weighted by the key weights w^K_t (1 without Hessian weighting)."""
    v: Moment
    """Moments weighted by the value weights w^V_t."""
    count: int
    """Calibration tokens."""
    hessian_weighted: bool = False
    """True when the weights come from NLL gradients."""


def _attention_tapped(x_BSD: Tensor, w: ref.GQLAWeights, cfg: GQLAConfig, tap_k: Optional[Tensor],
                      tap_v: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """reference.attention_expanded with additive taps on the per-group keys/values (B,S,G,N /
    B,S,G,V); returns (y, latent c). Built from the reference's own building blocks."""
    S = x_BSD.shape[1]
    pos = torch.arange(S, device=x_BSD.device)
    q_nope, q_rope = ref.project_queries(x_BSD, w, cfg, pos)
    c, k_rope = ref.project_latent(x_BSD, w, cfg, pos)
    k_nope, v = ref.expand_latent(c, w, cfg)
    if tap_k is not None:
        k_nope, v = k_nope + tap_k, v + tap_v
    o = ref._attend_groups(q_nope, q_rope, k_nope, k_rope, v, ref._causal_mask(S, S, pos, pos),
                           cfg.softmax_scale, cfg.heads_per_group)
    return ref._output(o, w), c


def _forward_tapped(tokens_BS: Tensor, mw: rm.ModelWeights, cfg: GQLAConfig, taps=None):
    """reference_model.forward with taps; returns (logits, [latent c per layer])."""
    h = mw.embedding[tokens_BS]
    lat = []
    for l, lw in enumerate(mw.layers):
        tk, tv = (None, None) if taps is None else taps[l]
        y, c = _attention_tapped(ref.rms_norm(h, lw.input_norm, mw.eps), lw.attn, cfg, tk, tv)
        lat.append(c)
        h = h + y
        h = h + rm.mlp(h, lw, mw.eps)
    return ref.rms_norm(h, mw.final_norm, mw.eps) @ mw.output.T, lat


def collect_latent_stats(mw: rm.ModelWeights, cfg: GQLAConfig, calib_tokens: Tensor, *,
                         hessian_weighting: bool = False, batch: int = 4) -> List[LatentStats]:
    """Run the source model on ``calib_tokens`` (n, S) and return one LatentStats per layer
    (see module doc for the Hessian weights)."""
    if calib_tokens.ndim != 2 or calib_tokens.numel() == 0:
        raise ValueError(f"calib_tokens must be a non-empty (n, S) tensor, got shape "
                         f"{tuple(calib_tokens.shape)}")
    if hessian_weighting and calib_tokens.shape[1] < 2:
        raise ValueError("hessian_weighting needs calibration sequences of at least 2 tokens")
    C, G, N, V = cfg.kv_lora_rank, cfg.num_query_groups, cfg.qk_head_dim, cfg.v_head_dim
    L = len(mw.layers)
    zero = lambda: Moment(torch.zeros(C, C, dtype=F64), torch.zeros(C, dtype=F64), 0.0)
    acc = [(zero(), zero()) for _ in range(L)]
    count = 0
    for i in range(0, calib_tokens.shape[0], batch):
        tok = calib_tokens[i:i + batch]
        B, S = tok.shape
        count += B * S
        if not hessian_weighting:
            with torch.no_grad():
                _, lat = _forward_tapped(tok, mw, cfg)
            wk = wv = [torch.ones(B * S, dtype=F64)] * L
        else:
            lat, grads = nll_tap_grads(tok, lambda taps: _forward_tapped(tok, mw, cfg, taps),
                                       [((B, S, G, N), (B, S, G, V))] * L, mw.embedding.dtype)
            lat = [c.detach() for c in lat]
            wk = [gk.to(F64).pow(2).sum((2, 3)).reshape(-1) for gk, _ in grads]
            wv = [gv.to(F64).pow(2).sum((2, 3)).reshape(-1) for _, gv in grads]
        for l in range(L):
            c = lat[l].reshape(-1, C).to(F64)
            for m, wt in ((acc[l][0], wk[l]), (acc[l][1], wv[l])):
                m.cc += (c * wt[:, None]).T @ c
                m.c += wt @ c
                m.weight += float(wt.sum())
    out = []
    for l in range(L):
        mk, mv = acc[l]
        if hessian_weighting and (mk.weight <= 0 or mv.weight <= 0):
            raise ValueError(f"layer {l}: all NLL gradients are zero, cannot weight the statistics")
        # normalise the weights to mean 1 over the layer's tokens (scale-free, readable weights)
        for m in (mk, mv):
            s = count / m.weight
            m.cc, m.c, m.weight = m.cc * s, m.c * s, float(count)
        out.append(LatentStats(k=mk, v=mv, count=count, hessian_weighted=hessian_weighting))
    return out


# ----------------------------------------------------------------------------------------
# grouping
# ----------------------------------------------------------------------------------------
def per_head_up_proj(w: ref.GQLAWeights, cfg: GQLAConfig) -> Tuple[Tensor, Tensor]:
    """(H, N, C) key and (H, V, C) value up-projection of every head (float64)."""
    H, N = cfg.num_attention_heads, cfg.qk_head_dim
    A = ref.mla_layout_up_proj(w, cfg).to(F64).view(H, N + cfg.v_head_dim, -1)
    return A[:, :N], A[:, N:]


def _damped(S: Tensor, damping: float) -> Tensor:
    S = 0.5 * (S + S.T)
    return S + damping * S.diagonal().mean().clamp_min(0) * torch.eye(S.shape[0], dtype=S.dtype)


def head_similarity(A_K: Tensor, A_V: Tensor, S_K: Tensor, S_V: Tensor,
                    weights: Tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """(H, H) similarity of the heads' K/V subspaces (module doc); diagonal 0."""
    H = A_K.shape[0]
    sim = torch.zeros(H, H, dtype=F64)
    for A, S, wt in ((A_K, S_K, weights[0]), (A_V, S_V, weights[1])):
        if wt == 0:
            continue
        Lc = torch.linalg.cholesky(_damped(S, 1e-9))
        B = A @ Lc                                                   # (H, n, C): B B^T = A S A^T
        tr = B.pow(2).sum((1, 2)).clamp_min(1e-300)
        for h in range(H - 1):
            cross = torch.einsum("nc,kmc->knm", B[h], B[h + 1:])      # (H-h-1, n, n)
            val = wt * torch.linalg.svdvals(cross).sum(-1) / (tr[h] * tr[h + 1:]).sqrt()
            sim[h, h + 1:] += val
            sim[h + 1:, h] += val
    return sim


def _greedy_balanced(sim: Tensor, M: int) -> List[List[int]]:
    H = sim.shape[0]
    left = list(range(H))
    groups = []
    while left:
        if len(left) == M:
            groups.append(sorted(left))
            break
        best, seed = -math.inf, None
        for a_i, a in enumerate(left):
            for b in left[a_i + 1:]:
                if sim[a, b] > best:
                    best, seed = float(sim[a, b]), [a, b]
        group = seed
        while len(group) < M:
            cand = [h for h in left if h not in group]
            scores = [float(sim[h, group].sum()) for h in cand]
            group = group + [cand[max(range(len(cand)), key=lambda k: (scores[k], -cand[k]))]]
        groups.append(sorted(group))
        left = [h for h in left if h not in group]
    return groups


def group_heads(grouping: Union[str, Sequence[Sequence[int]]], num_heads: int, num_groups: int, *,
                A_K: Optional[Tensor] = None, A_V: Optional[Tensor] = None,
                S_K: Optional[Tensor] = None, S_V: Optional[Tensor] = None,
                similarity_weights: Tuple[float, float] = (1.0, 1.0)) -> List[List[int]]:
    """Partition heads 0..H-1 into G groups of M = H/G: "neighbor", "similarity" (needs the
    up-projections and latent statistics) or an explicit list of G lists of M heads."""
    H, G = num_heads, num_groups
    if isinstance(G, bool) or not isinstance(G, int) or G <= 0 or H % G:
        raise ValueError(f"num_query_groups must be a positive divisor of num_attention_heads={H}, "
                         f"got {G!r}")
    M = H // G
    if isinstance(grouping, str):
        if grouping == "neighbor" or M == 1:
            if grouping not in GROUPINGS:
                raise ValueError(f"grouping must be one of {GROUPINGS} or a list of head groups, "
                                 f"got {grouping!r}")
            return [list(range(j * M, (j + 1) * M)) for j in range(G)]
        if grouping != "similarity":
            raise ValueError(f"grouping must be one of {GROUPINGS} or a list of head groups, got "
                             f"{grouping!r}")
        if any(t is None for t in (A_K, A_V, S_K, S_V)):
            raise ValueError("similarity grouping needs A_K, A_V, S_K and S_V")
        return _greedy_balanced(head_similarity(A_K, A_V, S_K, S_V, similarity_weights), M)
    groups = [list(map(int, g)) for g in grouping]
    if len(groups) != G or any(len(g) != M for g in groups) \
            or sorted(h for g in groups for h in g) != list(range(H)):
        raise ValueError(f"grouping must be {G} groups of {M} heads that partition 0..{H - 1}, "
                         f"got {groups}")
    return groups


# ----------------------------------------------------------------------------------------
# one layer
# ----------------------------------------------------------------------------------------
@dataclass
class MLALayerReport:
    """What the conversion of one layer kept."""

    layer: int
    """Layer index."""
    groups: List[List[int]]
    """Source heads of each new group, in their new order."""
    k_energy: List[float]
    """Per group: fraction of the (weighted, centred) stacked-key energy kept by the PCA."""
    v_energy: List[float]
    """Per group: fraction of the (weighted) stacked-value energy kept."""


def _pca(A: Tensor, S: Tensor, S0: Tensor, rank: int) -> Tuple[Tensor, float]:
    """Top-``rank`` eigenvectors of A S A^T and the kept fraction of tr(A S0 A^T)."""
    Sig = A @ S @ A.T
    evals, evecs = torch.linalg.eigh(0.5 * (Sig + Sig.T))
    U = evecs[:, torch.argsort(evals, descending=True)[:rank]]
    P = U.T @ A
    tot = ((A @ S0) * A).sum()
    kept = ((P @ S0) * P).sum()
    return U, float(kept / tot) if tot > 0 else 1.0


def convert_mla_layer(w: ref.GQLAWeights, cfg: GQLAConfig, stats: LatentStats, *,
                      num_query_groups: int, qk_head_dim: Optional[int] = None,
                      v_head_dim: Optional[int] = None,
                      grouping: Union[str, Sequence[Sequence[int]]] = "neighbor",
                      similarity_weights: Tuple[float, float] = (1.0, 1.0),
                      damping: float = 0.01, layer: int = 0
                      ) -> Tuple[ref.GQLAWeights, GQLAConfig, MLALayerReport]:
    """Regroup one MLA/GQLA layer to ``num_query_groups`` groups (module doc); float64 result.
    ``qk_head_dim`` / ``v_head_dim`` (d_n', d_v') default to the source N / V; at most M*N /
    M*V."""
    H, N, V, R, C = (cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim,
                     cfg.qk_pos_emb_head_dim, cfg.kv_lora_rank)
    G = num_query_groups
    if isinstance(G, bool) or not isinstance(G, int) or G <= 0 or H % G:
        raise ValueError(f"num_query_groups must be a positive divisor of num_attention_heads={H}, "
                         f"got {G!r}")
    M = H // G
    dn = N if qk_head_dim is None else qk_head_dim
    dv = V if v_head_dim is None else v_head_dim
    for name, val, hi in (("qk_head_dim", dn, M * N), ("v_head_dim", dv, M * V)):
        if isinstance(val, bool) or not isinstance(val, int) or not 0 < val <= hi:
            raise ValueError(f"{name} must be an integer in [1, heads_per_group * source dim = "
                             f"{hi}] (the rank of a group's stacked up-projection), got {val!r}")
    if not 0 <= damping < 1:
        raise ValueError(f"damping must be in [0, 1), got {damping!r}")
    for nm, m in (("k", stats.k), ("v", stats.v)):
        if tuple(m.cc.shape) != (C, C):
            raise ValueError(f"stats.{nm}.cc has shape {tuple(m.cc.shape)}, expected {(C, C)}")
    w.check(cfg)
    S_K0, S_V0 = stats.k.covariance(), stats.v.second()
    S_K, S_V = _damped(S_K0, damping), _damped(S_V0, damping)
    A_K, A_V = per_head_up_proj(w, cfg)
    groups = group_heads(grouping, H, G, A_K=A_K, A_V=A_V, S_K=S_K, S_V=S_V,
                         similarity_weights=similarity_weights)
    D = cfg.hidden_size
    WQ = w.W_UQ.to(F64).view(H, N + R, -1)
    WO = w.W_O.to(F64).view(D, H, V)
    qscale = math.sqrt((dn + R) / (N + R))
    W_UKV = torch.zeros(G, dn + dv, C, dtype=F64)
    W_UQ = torch.zeros(H, dn + R, WQ.shape[-1], dtype=F64)
    W_O = torch.zeros(D, H, dv, dtype=F64)
    k_en, v_en = [], []
    for j, members in enumerate(groups):
        AK = A_K[members].reshape(M * N, C)
        AV = A_V[members].reshape(M * V, C)
        U, ek = _pca(AK, S_K, S_K0, dn)
        T, ev = _pca(AV, S_V, S_V0, dv)
        k_en.append(ek)
        v_en.append(ev)
        W_UKV[j, :dn] = U.T @ AK
        W_UKV[j, dn:] = T.T @ AV
        for i, h in enumerate(members):
            p = j * M + i
            S_i, T_i = U[i * N:(i + 1) * N], T[i * V:(i + 1) * V]
            W_UQ[p, :dn] = S_i.T @ WQ[h, :N] * qscale
            W_UQ[p, dn:] = WQ[h, N:] * qscale
            W_O[:, p] = WO[:, h] @ T_i
    new_cfg = dataclasses.replace(cfg, num_query_groups=G, qk_head_dim=dn, v_head_dim=dv)
    f64 = lambda t: None if t is None else t.to(F64)
    out = ref.GQLAWeights(W_UQ=W_UQ.reshape(H * (dn + R), -1), W_DKV=f64(w.W_DKV),
                          W_KR=f64(w.W_KR), W_UKV=W_UKV.reshape(G * (dn + dv), C),
                          W_O=W_O.reshape(D, H * dv), W_DQ=f64(w.W_DQ), q_norm=f64(w.q_norm),
                          kv_norm=f64(w.kv_norm))
    out.check(new_cfg)
    return out, new_cfg, MLALayerReport(layer=layer, groups=groups, k_energy=k_en, v_energy=v_en)


# ----------------------------------------------------------------------------------------
# whole model
# ----------------------------------------------------------------------------------------
@dataclass
class MLAConversionReport:
    """Settings and per-layer/group retained energies of one convert_mla_model call."""

    num_query_groups: int
    """G."""
    grouping: str
    """"neighbor", "similarity" or "explicit"."""
    hessian_weighting: bool
    """True when the statistics were NLL-gradient weighted."""
    qk_head_dim: int
    """d_n' of the result."""
    v_head_dim: int
    """d_v' of the result."""
    calib_tokens: int
    """Calibration tokens."""
    layers: List[MLALayerReport] = field(default_factory=list)
    """One entry per layer."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """Multi-line ASCII summary."""
        ke = [e for l in self.layers for e in l.k_energy]
        ve = [e for l in self.layers for e in l.v_energy]
        lines = [f"MLA->GQLA G={self.num_query_groups} grouping={self.grouping} "
                 f"hessian={self.hessian_weighting} d_n'={self.qk_head_dim} "
                 f"d_v'={self.v_head_dim} calib_tokens={self.calib_tokens}",
                 f"  K energy kept: min {min(ke):.4f} mean {sum(ke) / len(ke):.4f}",
                 f"  V energy kept: min {min(ve):.4f} mean {sum(ve) / len(ve):.4f}"]
        for l in self.layers:
            lines.append(f"  layer {l.layer:3d}: K " + " ".join(f"{e:.4f}" for e in l.k_energy)
                         + " | V " + " ".join(f"{e:.4f}" for e in l.v_energy)
                         + f" | groups {l.groups}")
        return "\n".join(lines)


def convert_mla_model(mw: rm.ModelWeights, cfg: GQLAConfig, *, num_query_groups: int,
                      calib_tokens: Optional[Tensor] = None,
                      stats: Optional[Sequence[LatentStats]] = None,
                      grouping: Union[str, Sequence[Sequence[int]]] = "neighbor",
                      qk_head_dim: Optional[int] = None, v_head_dim: Optional[int] = None,
                      hessian_weighting: bool = False,
                      similarity_weights: Tuple[float, float] = (1.0, 1.0),
                      damping: float = 0.01, dtype: Optional[torch.dtype] = None, batch: int = 4
                      ) -> Tuple[rm.ModelWeights, GQLAConfig, MLAConversionReport]:
    """MLA (or GQLA) model -> GQLA with ``num_query_groups`` groups; returns (ModelWeights,
    GQLAConfig, report). Pass ``calib_tokens`` (n, S) or precomputed ``stats`` (from
    collect_latent_stats; then ``hessian_weighting`` must match how they were collected).
    ``grouping`` may also be a list of head lists (the same partition for every layer).
    Everything but the attention's W_UQ, W_UKV, W_O is copied; results are cast to ``dtype``
    (default: the source embedding's dtype)."""
    H = cfg.num_attention_heads
    if isinstance(num_query_groups, bool) or not isinstance(num_query_groups, int) \
            or num_query_groups <= 0 or H % num_query_groups:
        raise ValueError(f"num_query_groups must be a positive divisor of num_attention_heads={H}, "
                         f"got {num_query_groups!r}")
    M = H // num_query_groups
    dn = cfg.qk_head_dim if qk_head_dim is None else qk_head_dim
    dv = cfg.v_head_dim if v_head_dim is None else v_head_dim
    for name, val, hi in (("qk_head_dim", dn, M * cfg.qk_head_dim), ("v_head_dim", dv, M * cfg.v_head_dim)):
        if isinstance(val, bool) or not isinstance(val, int) or not 0 < val <= hi:
            raise ValueError(f"{name} must be an integer in [1, heads_per_group * source dim = "
                             f"{hi}], got {val!r}")
    if isinstance(grouping, str) and grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS} or a list of head groups, got {grouping!r}")
    if not isinstance(grouping, str):
        group_heads(grouping, H, num_query_groups)                    # validate before any work
    if (stats is None) == (calib_tokens is None):
        raise ValueError("pass exactly one of calib_tokens and stats")
    for lw in mw.layers:
        lw.attn.check(cfg)
    if stats is None:
        stats = collect_latent_stats(mw, cfg, calib_tokens, hessian_weighting=hessian_weighting,
                                     batch=batch)
    if len(stats) != len(mw.layers):
        raise ValueError(f"stats has {len(stats)} entries, the model has {len(mw.layers)} layers")
    if any(s.hessian_weighted != hessian_weighting for s in stats):
        raise ValueError(f"hessian_weighting={hessian_weighting} but the given stats were "
                         f"collected with hessian_weighting={stats[0].hessian_weighted}")
    dtype = mw.embedding.dtype if dtype is None else dtype
    report = MLAConversionReport(
        num_query_groups=num_query_groups,
        grouping=grouping if isinstance(grouping, str) else "explicit",
        hessian_weighting=hessian_weighting, qk_head_dim=dn, v_head_dim=dv,
        calib_tokens=stats[0].count)
    layers, new_cfg = [], None
    for l, (lw, st) in enumerate(zip(mw.layers, stats)):
        aw, new_cfg, lr = convert_mla_layer(lw.attn, cfg, st, num_query_groups=num_query_groups,
                                            qk_head_dim=dn, v_head_dim=dv, grouping=grouping,
                                            similarity_weights=similarity_weights,
                                            damping=damping, layer=l)
        report.layers.append(lr)
        layers.append(rm.LayerWeights(input_norm=lw.input_norm.to(dtype), attn=aw.to(dtype),
                                      mlp_norm=lw.mlp_norm.to(dtype), W_fc1=lw.W_fc1.to(dtype),
                                      W_fc2=lw.W_fc2.to(dtype)))
    emb = mw.embedding.to(dtype)
    out = emb if mw.output is mw.embedding else mw.output.to(dtype)
    return (rm.ModelWeights(embedding=emb, layers=layers, final_norm=mw.final_norm.to(dtype),
                            output=out, eps=mw.eps), new_cfg, report)
