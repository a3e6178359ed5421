r"""TransGQLA: convert a pretrained GQA (LLaMA-architecture) model to GQLA reference weights.

Pure functions on full CPU tensors; every covariance, eigendecomposition and weight product is
done in float64 (results are cast to the requested dtype at the end). Input weights are in the
HF/Megatron half-split RoPE layout (``gguf_import`` undoes llama.cpp's permutation). Follows
docs/gqla-method.md sections 5.2 and 6.3-6.5 (TransMLA's pipeline, packaged per group).

Symbols: D model width, H query heads, g KV heads (= GQLA groups), m = H/g, d source head dim,
L = g*d latent width, d_r = ``rope_dim`` (shared RoPE key), r = ``kv_lora_rank``,
f = ``freqfold``, c = d/d_r (collapse).

Pipeline per layer
------------------
1. Merge (exact). The g key heads form one latent key k = W_K x in R^L; group j reads it through
   the selector U_K^(j) = [0 .. I_d .. 0] (d x L). Same for V.
2. RoRoPE (exact for f = 1 before truncation). The d/2 frequencies are cut into buckets of f
   adjacent frequencies. Bucket b collects the (g*f)-dim vector z over (head, frequency) of the
   real coordinates and, as separate samples, of the imaginary coordinates; U_b = eigenvectors of
   sum z z^T (uncentred, float64, damped by 1% of the mean diagonal), sorted by descending
   eigenvalue. U_b^T is applied identically to the real and to the imaginary coordinates
   (rows of W_K; columns of U_K^(j)). For f = 1 it mixes only coordinates that share one
   frequency, so it commutes with RoPE: nothing changes.
3. Partial RoPE (lossy unless the dropped components are zero). In every bucket the top f/c
   components keep RoPE: component l of bucket b becomes interleaved pair k = b*(f/c) + l of the
   shared d_r-dim RoPE key and rotates with theta_{f*b + c*l} = theta'_k, where theta' is the RoPE
   table of the reference (base^(-2k/d_r) with the source base: theta'_k = theta_{c*k}). For
   f = c = 1 every component keeps its own exact frequency. All other components (L - d_r of
   them) lose RoPE and become the content ("NoPE") latent key K_n.
   GQLA has ONE RoPE key per token shared by all heads and groups; the source has g RoPE'd keys.
   This step is what concentrates the positional part into d_r shared dims.
4. BKV-PCA (exact for r = 2L - d_r, lossy below). alpha = mean_f ||K_n[:, f]|| / (mean_f
   ||V[:, f]|| * balance_kv_ratio) (column L2 norms over calibration tokens). Joint uncentred PCA
   of Z = [K_n/alpha ; V] (2L - d_r dims, float64, 1% damping): R = top-r eigenvectors.
   W_DKV = R^T [W_Kn/alpha ; W_V] (r x D). Per GROUP j the up-projection block is
   [[alpha U_Kn^(j), 0], [0, U_V^(j)]] R, rows [K (d_n) ; V (d_v)]: one block per group, not
   per head (the GQLA packaging; TransMLA would repeat it per head).
   ``kv_lora_rank=None`` skips the PCA (R = I, alpha = 1, r = 2L - d_r): the "partial RoPE
   only" stage, useful to measure the loss of step 3 alone.
5. Queries (exact). q^C_i = W_Q^(i) (d rows) and q^R_i = U_K,rope^(j)^T W_Q^(i) (d_r rows),
   all scaled by sqrt((d_n + d_r)/d) because the softmax scale changes from d^-1/2 to
   (d_n + d_r)^-1/2. W_O is unchanged.

Dimension choice: d_n = d_v = d (the source head dim, section 5.2): the content key of group j
lives in the source head's own key space, so q^C_i is the source query unchanged, and the value
heads and W_O are unchanged. No latent RMSNorm (kv_norm None, GQLAConfig.qk_layernorm False) and
no query latent (q_lora_rank None).

Calibration: ``collect_attention_stats`` runs the source model (``gguf_import.gqa_forward``)
and accumulates, per layer, the uncentred second moment Sigma = sum_t x_t x_t^T (float64) of the
attention input x (after the input RMSNorm). Every K/V activation covariance the pipeline needs
is W Sigma W^T for a row set W of the (rotated) key/value projections, which equals the
covariance of the K/V activations themselves exactly, at a fraction of the memory.

Hessian (NLL) weighting (``hessian_weighting=True``; paper section 3.2.1, here with gradient
weights): Sigma = sum_t w_t x_t x_t^T / sum_t w_t with a per-token, per-layer weight from the
empirical Fisher of the next-token NLL. The source model is run with autograd on CPU
(``gqa_forward_tapped``: zero "taps" added to the pre-RoPE keys k_t = W_K x_t and values
v_t = W_V x_t of every layer); one backward of the summed NLL gives g^K_t = dNLL/dk_t and
g^V_t = dNLL/dv_t. With a^K_t = ||g^K_t||^2 and a^V_t = ||g^V_t||^2, each normalised to mean 1
over the layer's calibration tokens, w_t = (a^K_t + a^V_t) / 2 (mean 1). This is the diagonal
(per-token, isotropic) Fisher approximation of the Hessian of the NLL with respect to the
token's K/V activations: the PCA then minimises sum_t w_t ||z_t - P z_t||^2, the second-order
NLL increase under that approximation, instead of the plain reconstruction error. One weight
per token serves RoRoPE, the BKV balance and the joint K/V PCA (which needs one consistent
covariance of [K_n; V]). The last position of every sequence gets weight 0 (nothing in the
loss reads its K/V). Costs one forward + backward of the source model over the calibration
tokens (activation memory: use a small ``batch``).

What is exact, what is not (tests/cpu/test_transgqla.py checks each stage):
- merge, RoRoPE with f = 1 (before truncation), BKV scaling, PCA at full rank, query scaling,
  group packaging: exact (float64 round-off);
- partial RoPE: exact only when every dropped component is zero on the calibration and test
  inputs, e.g. a GQA model whose RoPE'd key content is rank one across heads at every
  frequency (then f = 1, d_r = d keeps all of it) -- a real model does not have this;
- f > 1: approximate (several frequencies share one);
- PCA truncation r < 2L - d_r: lossy (the report gives the retained energy per layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from gqla_megatron import reference as ref
from gqla_megatron import reference_model as rm
from gqla_megatron.config import GQLAConfig
from gqla_megatron.conversion.gguf_import import (GQALayerWeights, GQAModelConfig,
                                                  GQAModelWeights, gqa_forward, rope_half_split)

__all__ = [
    "LayerStats", "MergedKV", "RoRoPEBasis", "LayerReport", "ConversionReport",
    "collect_attention_stats", "gqa_forward_tapped", "merge_kv_heads", "rorope_basis", "split_rope",
    "convert_layer", "gqla_config_for", "convert_model",
]

F64 = torch.float64


# ----------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Calibration statistics of one attention input x (after the input RMSNorm)."""

    xx: Tensor
    """(D, D) float64 uncentred second moment sum_t x_t x_t^T."""
    count: int
    """Number of tokens summed into ``xx`` (with Hessian weighting the weights have mean 1, so
    the weights also sum to ``count``)."""
    hessian_weighted: bool = False
    """True when ``xx`` is NLL-gradient (diagonal Fisher) weighted (module doc)."""

    @property
    def cov(self) -> Tensor:
        """(D, D) mean second moment xx / count."""
        if self.count <= 0:
            raise ValueError("LayerStats.count is 0: no calibration tokens were collected")
        return self.xx / self.count


def _gqa_attention_tapped(x_BSD: Tensor, lw: GQALayerWeights, cfg: GQAModelConfig,
                          tap_k: Tensor, tap_v: Tensor) -> Tensor:
    """gguf_import.gqa_attention with additive taps on the pre-RoPE keys and the values
    (B, S, g*d each); same math, checked against it in the tests."""
    B, S, _ = x_BSD.shape
    H, g, d, m = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, cfg.heads_per_group
    pos = torch.arange(S)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    q = rope_half_split((x_BSD @ lw.W_Q.T).view(B, S, H, d), pos, cfg.rope_base)
    k = rope_half_split((x_BSD @ lw.W_K.T + tap_k).view(B, S, g, d), pos, cfg.rope_base)
    v = (x_BSD @ lw.W_V.T + tap_v).view(B, S, g, d)
    k = k.repeat_interleave(m, dim=2)
    v = v.repeat_interleave(m, dim=2)
    s = torch.einsum("bshd,bthd->bhst", q, k) * d ** -0.5
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    return torch.einsum("bhst,bthd->bshd", p, v).reshape(B, S, H * d) @ lw.W_O.T


def gqa_forward_tapped(tokens_BS: Tensor, w: GQAModelWeights, cfg: GQAModelConfig,
                       taps: Sequence[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, List[Tensor]]:
    """gqa_forward with zero-valued taps (tap_k, tap_v) per layer added to the keys and values,
    so that autograd gives dLoss/dk_t, dLoss/dv_t per token. Returns (logits, attention inputs
    x per layer)."""
    if len(taps) != len(w.layers):
        raise ValueError(f"need one (tap_k, tap_v) pair per layer ({len(w.layers)}), got {len(taps)}")
    h = w.embedding[tokens_BS]
    xs = []
    for lw, (tk, tv) in zip(w.layers, taps):
        x = ref.rms_norm(h, lw.attn_norm, cfg.eps)
        xs.append(x)
        h = h + _gqa_attention_tapped(x, lw, cfg, tk, tv)
        gate, up = (ref.rms_norm(h, lw.mlp_norm, cfg.eps) @ lw.W_fc1.T).chunk(2, -1)
        h = h + (torch.nn.functional.silu(gate) * up) @ lw.W_fc2.T
    return ref.rms_norm(h, w.final_norm, cfg.eps) @ w.output.T, xs


def nll_tap_grads(tokens_BS: Tensor, forward_tapped, tap_shapes, dtype: torch.dtype):
    """Gradients of the next-token NLL (summed over the batch) w.r.t. zero-valued taps added to
    each layer's keys and values: (the forward's second output, [(grad_k, grad_v) per layer]).
    ``forward_tapped(taps)`` -> (logits (B, S, vocab), anything); ``tap_shapes``: one
    (key shape, value shape) per layer. The squared gradients are the diagonal Fisher weights
    of the Hessian-weighted statistics."""
    taps = [(torch.zeros(sk, dtype=dtype, requires_grad=True), torch.zeros(sv, dtype=dtype, requires_grad=True))
            for sk, sv in tap_shapes]
    with torch.enable_grad():
        logits, extra = forward_tapped(taps)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens_BS[:, 1:].reshape(-1),
            reduction="sum")
        grads = torch.autograd.grad(nll, [t for pair in taps for t in pair])
    return extra, [(grads[2 * l], grads[2 * l + 1]) for l in range(len(taps))]


def _hessian_stats(w: GQAModelWeights, cfg: GQAModelConfig, calib_tokens: Tensor,
                   batch: int) -> List[LayerStats]:
    D, L, gd = cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads * cfg.head_dim
    xk = [torch.zeros(D, D, dtype=F64) for _ in range(L)]
    xv = [torch.zeros(D, D, dtype=F64) for _ in range(L)]
    sk, sv = [0.0] * L, [0.0] * L
    count = 0
    for i in range(0, calib_tokens.shape[0], batch):
        tok = calib_tokens[i:i + batch]
        B, S = tok.shape
        count += B * S
        xs, grads = nll_tap_grads(tok, lambda taps: gqa_forward_tapped(tok, w, cfg, taps),
                                  [((B, S, gd), (B, S, gd))] * L, w.embedding.dtype)
        for l in range(L):
            x2 = xs[l].detach().reshape(-1, D).to(F64)
            ak = grads[l][0].to(F64).pow(2).sum(-1).reshape(-1)
            av = grads[l][1].to(F64).pow(2).sum(-1).reshape(-1)
            xk[l] += (x2 * ak[:, None]).T @ x2
            xv[l] += (x2 * av[:, None]).T @ x2
            sk[l] += float(ak.sum())
            sv[l] += float(av.sum())
    out = []
    for l in range(L):
        if not (sk[l] > 0 and sv[l] > 0):
            raise ValueError(f"layer {l}: the NLL gradients w.r.t. its keys/values are all zero; "
                             f"cannot Hessian-weight its statistics")
        out.append(LayerStats(0.5 * count * (xk[l] / sk[l] + xv[l] / sv[l]), count,
                              hessian_weighted=True))
    return out


@torch.no_grad()
def collect_attention_stats(w: GQAModelWeights, cfg: GQAModelConfig, calib_tokens: Tensor,
                            batch: int = 4, hessian_weighting: bool = False) -> List[LayerStats]:
    """Run the source model on ``calib_tokens`` (N, S) and return one LayerStats per layer;
    ``hessian_weighting``: NLL-gradient token weights (module doc; runs autograd)."""
    if calib_tokens.ndim != 2 or calib_tokens.numel() == 0:
        raise ValueError(f"calib_tokens must be a non-empty (N, S) tensor, got shape "
                         f"{tuple(calib_tokens.shape)}")
    if hessian_weighting:
        if calib_tokens.shape[1] < 2:
            raise ValueError("hessian_weighting needs calibration sequences of at least 2 tokens")
        if w.rope_layout != "half_split":
            raise ValueError(f"GQAModelWeights.rope_layout is {w.rope_layout!r}; hessian_weighting "
                             f"runs the half-split forward")
        return _hessian_stats(w, cfg, calib_tokens, batch)
    D = cfg.hidden_size
    stats = [LayerStats(torch.zeros(D, D, dtype=F64), 0) for _ in range(cfg.num_layers)]

    def hook(l, x):
        x2 = x.reshape(-1, D).to(F64)
        stats[l].xx += x2.T @ x2
        stats[l].count += x2.shape[0]

    for i in range(0, calib_tokens.shape[0], batch):
        gqa_forward(calib_tokens[i:i + batch], w, cfg, attn_input_hook=hook,
                    stop_after_last_attention=True)
    return stats


# ----------------------------------------------------------------------------------------
# step 1: merge
# ----------------------------------------------------------------------------------------
@dataclass
class MergedKV:
    """KV heads merged into one latent: k_lat = W_K x, group j reads U_K[j] k_lat."""

    W_K: Tensor
    """(L, D) latent key projection (the g source key heads stacked), L = g*d."""
    W_V: Tensor
    """(L, D) latent value projection."""
    U_K: Tensor
    """(g, d, L) per-group key up-projection (selector of block j)."""
    U_V: Tensor
    """(g, d, L) per-group value up-projection (selector of block j)."""


def merge_kv_heads(W_K: Tensor, W_V: Tensor, num_kv_heads: int) -> MergedKV:
    """Step 1 (exact): latent = stacked KV heads, selector up-projections per group (float64)."""
    if W_K.shape != W_V.shape or W_K.shape[0] % num_kv_heads:
        raise ValueError(f"W_K {tuple(W_K.shape)} and W_V {tuple(W_V.shape)} must be equal and "
                         f"have a multiple of num_kv_heads={num_kv_heads} rows")
    g = num_kv_heads
    L = W_K.shape[0]
    d = L // g
    U = torch.zeros(g, d, L, dtype=F64)
    for j in range(g):
        U[j, :, j * d:(j + 1) * d] = torch.eye(d, dtype=F64)
    return MergedKV(W_K.to(F64), W_V.to(F64), U, U.clone())


# ----------------------------------------------------------------------------------------
# steps 2-3: RoRoPE and partial RoPE
# ----------------------------------------------------------------------------------------
def _damped_eigh(C: Tensor, damping: float) -> Tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric float64 matrix plus damping*mean(diag)*I, descending.
    Returns (undamped eigenvalues, eigenvectors as columns)."""
    C = 0.5 * (C + C.T)
    shift = damping * C.diagonal().mean()
    evals, evecs = torch.linalg.eigh(C + shift * torch.eye(C.shape[0], dtype=C.dtype))
    order = torch.argsort(evals, descending=True)
    return evals[order] - shift, evecs[:, order]


@dataclass
class RoRoPEBasis:
    """Orthogonal RoRoPE rotation of the latent key (before truncation)."""

    P: Tensor
    """(L, L) orthogonal: rotated coordinate ((b*g*f + l)*2 + s) = row of P applied to k_lat,
    for bucket b, component l (descending energy), s = 0 real / 1 imaginary."""
    energy: Tensor
    """(n_b, g*f) undamped eigenvalues per bucket and component (mean per sample)."""
    freq_index: Tensor
    """(L,) index f*b (into the source table theta_k) of the first frequency of each rotated
    coordinate's bucket: its exact frequency when f = 1."""
    freqfold: int
    """f: adjacent frequencies per bucket."""


def _latent_index(g: int, d: int, j: int, s: int, k: int) -> int:
    """Latent coordinate of head j, half s (0 real, 1 imaginary), frequency k (half-split)."""
    return j * d + s * (d // 2) + k


def rorope_basis(cov_K: Tensor, num_kv_heads: int, head_dim: int, freqfold: int,
                 damping: float = 0.01) -> RoRoPEBasis:
    """Step 2: per-bucket PCA rotation of the latent key, from its (L, L) second moment cov_K."""
    g, d, f = num_kv_heads, head_dim, freqfold
    if isinstance(f, bool) or not isinstance(f, int) or f <= 0 or (d // 2) % f:
        raise ValueError(f"freqfold must be a positive divisor of head_dim/2 = {d // 2}, got {f!r}")
    L = g * d
    if cov_K.shape != (L, L):
        raise ValueError(f"cov_K has shape {tuple(cov_K.shape)}, expected {(L, L)}")
    n_b = d // 2 // f
    gf = g * f
    P = torch.zeros(L, L, dtype=F64)
    energy = torch.zeros(n_b, gf, dtype=F64)
    freq = torch.zeros(L, dtype=torch.long)
    C = cov_K.to(F64)
    for b in range(n_b):
        idx = [[_latent_index(g, d, j, s, b * f + t) for j in range(g) for t in range(f)]
               for s in (0, 1)]
        H_b = C[idx[0]][:, idx[0]] + C[idx[1]][:, idx[1]]
        ev, U = _damped_eigh(H_b, damping)
        energy[b] = ev / 2                                   # two samples (real, imag) per token
        for l in range(gf):
            for s in (0, 1):
                row = (b * gf + l) * 2 + s
                P[row, idx[s]] = U[:, l]
                freq[row] = b * f
    return RoRoPEBasis(P=P, energy=energy, freq_index=freq, freqfold=f)


def split_rope(basis: RoRoPEBasis, head_dim: int, rope_dim: int) -> Tuple[Tensor, Tensor]:
    """Step 3: rows of ``basis.P`` that keep RoPE (d_r, interleaved pair order of the shared
    key) and rows that become NoPE (L - d_r). Returns (P_rope, P_nope)."""
    d, f = head_dim, basis.freqfold
    if isinstance(rope_dim, bool) or not isinstance(rope_dim, int) or rope_dim <= 0 \
            or rope_dim % 2 or d % rope_dim:
        raise ValueError(f"rope_dim must be an even divisor of head_dim={d}, got {rope_dim!r}")
    c = d // rope_dim
    if f % c:
        raise ValueError(f"freqfold ({f}) must be a multiple of collapse = head_dim/rope_dim = "
                         f"{c}: each bucket of f frequencies keeps f/c RoPE components")
    keep = f // c
    n_b, gf = basis.energy.shape
    rope_rows, nope_rows = [], []
    for b in range(n_b):
        for l in range(gf):
            rows = [(b * gf + l) * 2, (b * gf + l) * 2 + 1]
            (rope_rows if l < keep else nope_rows).extend(rows)
    return basis.P[rope_rows], basis.P[nope_rows]


# ----------------------------------------------------------------------------------------
# steps 4-5 and packaging: one layer
# ----------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """What the conversion of one layer kept."""

    layer: int
    """Layer index."""
    rope_energy: float
    """Fraction of the latent key energy on the d_r RoPE components (the rest loses RoPE)."""
    kv_energy: float
    """Fraction of the [K_n/alpha ; V] energy kept by the rank-r PCA (1.0 without PCA)."""
    alpha: float
    """BKV balance factor."""


def convert_layer(lw: GQALayerWeights, cfg: GQAModelConfig, cov_x: Tensor, *,
                  kv_lora_rank: Optional[int], rope_dim: int, freqfold: int,
                  balance_kv_ratio: float = 1.0, damping: float = 0.01, layer: int = 0
                  ) -> Tuple[ref.GQLAWeights, LayerReport]:
    """Convert one GQA attention layer to float64 GQLAWeights (see module doc).

    ``cov_x``: (D, D) second moment of the layer's attention input. ``kv_lora_rank=None``: no
    PCA (latent width 2L - d_r)."""
    g, d, H, D = cfg.num_kv_heads, cfg.head_dim, cfg.num_attention_heads, cfg.hidden_size
    m, L = cfg.heads_per_group, cfg.num_kv_heads * cfg.head_dim
    if cov_x.shape != (D, D):
        raise ValueError(f"cov_x has shape {tuple(cov_x.shape)}, expected {(D, D)}")
    if not balance_kv_ratio > 0:
        raise ValueError(f"balance_kv_ratio must be > 0, got {balance_kv_ratio!r}")
    Sx = cov_x.to(F64)
    mk = merge_kv_heads(lw.W_K, lw.W_V, g)                                   # step 1
    basis = rorope_basis(mk.W_K @ Sx @ mk.W_K.T, g, d, freqfold, damping)    # step 2
    P_rope, P_nope = split_rope(basis, d, rope_dim)                          # step 3
    W_KR = P_rope @ mk.W_K                                                   # (d_r, D)
    W_Kn = P_nope @ mk.W_K                                                   # (L - d_r, D)
    UK_rope = mk.U_K @ P_rope.T                                              # (g, d, d_r)
    UK_nope = mk.U_K @ P_nope.T                                              # (g, d, L - d_r)
    key_energy = torch.diagonal(mk.W_K @ Sx @ mk.W_K.T).sum()
    rope_energy = float(torch.diagonal(W_KR @ Sx @ W_KR.T).sum() / key_energy)

    # step 4: BKV-PCA
    width = 2 * L - rope_dim
    if kv_lora_rank is None:
        alpha = 1.0
    else:
        if isinstance(kv_lora_rank, bool) or not isinstance(kv_lora_rank, int) \
                or not 0 < kv_lora_rank <= width:
            raise ValueError(f"kv_lora_rank must be an integer in [1, 2*g*d - rope_dim = {width}], "
                             f"got {kv_lora_rank!r}")
        kn = torch.diagonal(W_Kn @ Sx @ W_Kn.T).clamp_min(0).sqrt().mean()
        vn = torch.diagonal(mk.W_V @ Sx @ mk.W_V.T).clamp_min(0).sqrt().mean()
        # a zero NoPE key (nothing lost its RoPE) has nothing to balance
        alpha = float(kn / (vn * balance_kv_ratio)) if kn > 1e-12 * vn else 1.0
    W_Z = torch.cat([W_Kn / alpha, mk.W_V], 0)                               # (width, D)
    U_Z = torch.zeros(g, 2 * d, width, dtype=F64)                            # per-group blocks
    U_Z[:, :d, :L - rope_dim] = UK_nope * alpha
    U_Z[:, d:, L - rope_dim:] = mk.U_V
    if kv_lora_rank is None:
        R = torch.eye(width, dtype=F64)
        kv_energy = 1.0
    else:
        C_Z = W_Z @ Sx @ W_Z.T
        ev, vecs = _damped_eigh(C_Z, damping)
        R = vecs[:, :kv_lora_rank]
        kv_energy = float(ev[:kv_lora_rank].sum() / ev.sum())
    W_DKV = R.T @ W_Z                                                        # (r, D)
    W_UKV = (U_Z @ R).reshape(g * 2 * d, -1)                                 # (g(d_n+d_v), r)

    # step 5: queries, per head: [q^C (d) ; q^R (d_r)], rescaled for the new softmax scale
    scale = math.sqrt((d + rope_dim) / d)
    WQ = lw.W_Q.to(F64).view(H, d, D)
    q_rope = torch.einsum("hdr,hde->hre", UK_rope.repeat_interleave(m, 0), WQ)   # (H, d_r, D)
    W_UQ = torch.cat([WQ, q_rope], 1).reshape(H * (d + rope_dim), D) * scale
    w = ref.GQLAWeights(W_UQ=W_UQ, W_DKV=W_DKV, W_KR=W_KR, W_UKV=W_UKV, W_O=lw.W_O.to(F64))
    return w, LayerReport(layer=layer, rope_energy=rope_energy, kv_energy=kv_energy, alpha=alpha)


def gqla_config_for(cfg: GQAModelConfig, *, kv_lora_rank: Optional[int], rope_dim: int
                    ) -> GQLAConfig:
    """GQLAConfig of the converted model: g = source KV heads, d_n = d_v = d, d_r = rope_dim,
    same RoPE base (theta'_k = theta_{c k}), no latent norms, full-rank queries."""
    r = kv_lora_rank if kv_lora_rank is not None else 2 * cfg.num_kv_heads * cfg.head_dim - rope_dim
    return GQLAConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                      num_query_groups=cfg.num_kv_heads, kv_lora_rank=r, qk_head_dim=cfg.head_dim,
                      qk_pos_emb_head_dim=rope_dim, v_head_dim=cfg.head_dim, q_lora_rank=None,
                      rotary_base=cfg.rope_base, layernorm_epsilon=cfg.eps, qk_layernorm=False)


# ----------------------------------------------------------------------------------------
# whole model
# ----------------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    """Settings and per-layer retained energies of one convert_model call."""

    kv_lora_rank: int
    """r of the converted model (2L - d_r when the PCA was skipped)."""
    rope_dim: int
    """d_r."""
    freqfold: int
    """f."""
    calib_tokens: int
    """Tokens behind the calibration statistics (of the first layer)."""
    layers: List[LayerReport] = field(default_factory=list)
    """One entry per layer."""
    source_cache_per_token: int = 0
    """KV values cached per token per layer by the source GQA model: 2*g*d."""
    absorb_cache_per_token: int = 0
    """KV values cached per token per layer by the converted model's MQA-absorb path: r + d_r."""
    hessian_weighting: bool = False
    """True when the calibration statistics were NLL-gradient (diagonal Fisher) weighted."""

    def summary(self) -> str:
        """Multi-line ASCII summary."""
        re_ = [l.rope_energy for l in self.layers]
        ke = [l.kv_energy for l in self.layers]
        lines = [f"TransGQLA r={self.kv_lora_rank} d_r={self.rope_dim} freqfold={self.freqfold} "
                 f"calib_tokens={self.calib_tokens} hessian={self.hessian_weighting} "
                 f"cache/token/layer {self.source_cache_per_token} -> {self.absorb_cache_per_token}",
                 f"  RoPE-key energy kept: min {min(re_):.4f} mean {sum(re_) / len(re_):.4f}",
                 f"  KV PCA energy kept:   min {min(ke):.4f} mean {sum(ke) / len(ke):.4f}"]
        lines += [f"  layer {l.layer:3d}: rope {l.rope_energy:.4f} kv {l.kv_energy:.4f} "
                  f"alpha {l.alpha:.3f}" for l in self.layers]
        return "\n".join(lines)


def convert_model(gqa_weights: GQAModelWeights, gqa_cfg: GQAModelConfig, *,
                  kv_lora_rank: Optional[int], rope_dim: int, freqfold: int,
                  calib_tokens: Optional[Tensor] = None,
                  stats: Optional[Sequence[LayerStats]] = None, balance_kv_ratio: float = 1.0,
                  damping: float = 0.01, dtype: torch.dtype = torch.float32, batch: int = 4,
                  hessian_weighting: bool = False
                  ) -> Tuple[rm.ModelWeights, GQLAConfig, ConversionReport]:
    """Convert every layer of a GQA model to GQLA; returns (ModelWeights, GQLAConfig, report).

    Calibration: pass ``calib_tokens`` (N, S) (the source model is run on them) or precomputed
    ``stats`` from collect_attention_stats (to reuse one calibration for several budgets).
    ``hessian_weighting``: NLL-gradient weighted statistics (module doc); with ``stats`` it must
    match how they were collected.
    Embedding, norms, MLPs, LM head (tie kept) and W_O are copied; weights are cast to ``dtype``."""
    if gqa_weights.rope_layout != "half_split":
        raise ValueError(f"gqa_weights.rope_layout is {gqa_weights.rope_layout!r}; the converter "
                         f"needs half-split (HF/Megatron) Q/K rows")
    if len(gqa_weights.layers) != gqa_cfg.num_layers:
        raise ValueError(f"gqa_weights has {len(gqa_weights.layers)} layers, gqa_cfg.num_layers "
                         f"is {gqa_cfg.num_layers}")
    if (stats is None) == (calib_tokens is None):
        raise ValueError("pass exactly one of calib_tokens and stats")
    if stats is None:
        stats = collect_attention_stats(gqa_weights, gqa_cfg, calib_tokens, batch=batch,
                                        hessian_weighting=hessian_weighting)
    if len(stats) != gqa_cfg.num_layers:
        raise ValueError(f"stats has {len(stats)} entries, expected {gqa_cfg.num_layers}")
    if any(st.hessian_weighted != hessian_weighting for st in stats):
        raise ValueError(f"hessian_weighting={hessian_weighting} but the given stats were "
                         f"collected with hessian_weighting={stats[0].hessian_weighted}")
    cfg = gqla_config_for(gqa_cfg, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim)
    report = ConversionReport(kv_lora_rank=cfg.kv_lora_rank, rope_dim=rope_dim, freqfold=freqfold,
                              calib_tokens=stats[0].count,
                              source_cache_per_token=2 * gqa_cfg.num_kv_heads * gqa_cfg.head_dim,
                              absorb_cache_per_token=cfg.absorb_cache_elems_per_token,
                              hessian_weighting=hessian_weighting)
    layers = []
    for l, (lw, st) in enumerate(zip(gqa_weights.layers, stats)):
        aw, lr = convert_layer(lw, gqa_cfg, st.cov, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim,
                               freqfold=freqfold, balance_kv_ratio=balance_kv_ratio,
                               damping=damping, layer=l)
        aw.check(cfg)
        report.layers.append(lr)
        layers.append(rm.LayerWeights(input_norm=lw.attn_norm.to(dtype), attn=aw.to(dtype),
                                      mlp_norm=lw.mlp_norm.to(dtype), W_fc1=lw.W_fc1.to(dtype),
                                      W_fc2=lw.W_fc2.to(dtype)))
    emb = gqa_weights.embedding.to(dtype)
    out = emb if gqa_weights.tied_output else gqa_weights.output.to(dtype)
    mw = rm.ModelWeights(embedding=emb, layers=layers, final_norm=gqa_weights.final_norm.to(dtype),
                         output=out, eps=gqa_cfg.eps)
    return mw, cfg, report
