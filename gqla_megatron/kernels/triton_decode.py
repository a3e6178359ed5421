"""Triton decode-attention kernels for GQLA's two decode paths (split-KV, s_q <= a few tokens).

Both kernels compute, for S new query tokens per sequence (query s at position lengths[b] + s,
its K/V already in the cache, seeing cache slots t <= lengths[b] + s):

    o[b, s, h] = softmax_t(scale * (q[b, s, h] . k[b, t] + q_rope[b, s, h] . k_rope[b, t])) @ v[b, t]

* ``absorb_decode`` -- MQA-absorb path. One latent KV head: K = [c ; k_rope] (width r + d_r),
  V = c (width r). The query is already W_UK-folded (q_abs, width r); the caller applies W_UV
  to the latent output. All H query heads x S tokens of a sequence are rows of one tile
  (row m = s * H + h; beyond block_m rows, several row blocks each read the KV), so each KV
  tile is read once per sequence per split; the latent tile c is loaded once and used twice
  (as K^T for the scores and as V for the output).
* ``gqa_decode`` -- GQA path. Per group g: K = [k_nope[g] ; k_rope] (d_n + d_r), V = v[g] (d_v).
  The group's M = H / G heads x S tokens are the rows of one tile; the RoPE key (stored once
  per token for all groups) is read once per token by each group's program.

Split-KV ("flash-decoding"): each (sequence, row block[, group]) is cut into ``num_splits``
chunks of the sequence's keys; one program per chunk writes an fp32 partial output normalised
by its own softmax sum plus the chunk's log-sum-exp (base 2); a small combine kernel merges the
chunks (weights 2^(lse_i - max lse)). With one split the partial kernel writes the final output
directly and no combine runs. Inputs bf16 / fp16 / fp32 (fp32 dots use IEEE precision);
accumulation is always fp32. Lengths may differ per sequence (ragged batch).

Cache layouts (last dim contiguous; other strides free):
  contiguous  absorb: c (B, T, r), k_rope (B, T, d_r)
              gqa:    k_nope (B, T, G, d_n), v (B, T, G, d_v), k_rope (B, T, d_r)
  paged       the same with (num_blocks, block_size) in place of (B, T) -- a pool of pages -- and
              ``block_table`` (B, max_blocks) int32 (or int64): cache slot t of sequence b lives in page
              block_table[b, t // block_size] at row t % block_size.
Keys beyond the capacity (T, or max_blocks * block_size) are never read, whatever ``lengths``
says (``validate=True`` checks lengths and used page ids up front, at the cost of one host sync).

Number of splits (``choose_num_splits``). Without splitting there are units = B * row_blocks
(* G) programs; ``waves`` programs of the default tile fit on one SM at once (sm_90 occupancy,
checked offline by a CPU test), so slots = waves * SMs. A grid that fills 80 % of the slots is
not split; otherwise the split count is the smallest whose whole waves of programs take within
5 % of the best modelled time (a mostly-empty last wave costs a full one), capped so that every
split keeps at least ``min_chunk`` keys of the longest sequence (the partial outputs cost about
rows * d_v * 8 bytes per split of extra traffic, large for absorb's 512-wide latent) and at 256.
Defaults: absorb 32-row tiles waves 2, 64-row tiles waves 1, min_chunk 128; gqa waves 2,
min_chunk 64. The sequence length used is ``max_len`` if given, else the cache capacity (no host
sync).

Tuning knobs (for sweeps on the GPU; see ``DecodeKernelConfig``): an explicit ``config``
argument wins, then environment variables GQLA_DECODE_<PATH>_<FIELD> (PATH = ABSORB or GQA,
FIELD = BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES, NUM_SPLITS, MIN_CHUNK, WAVES), then the
defaults in ``default_config``. If a default configuration runs out of shared memory or
registers at compile time, the wrapper retries with fewer stages / smaller tiles (warning once)
and remembers the working one; an explicitly set configuration fails instead.

Warm-up: Triton compiles a kernel variant at the first launch that needs it (seconds each), so a
server compiles them at load instead (``warmup_plan``: the decode calls that launch every
variant a range of batch sizes and query counts will use; the decode backends run them on dummy
inputs).

CPU: the kernels run in Triton's interpreter (tests only; slow) when TRITON_INTERPRET=1 is set
before triton is first imported in the process: Triton jits its own helpers (tl.cdiv, tl.max,
...) at import in the mode the variable selects then. Our kernels are jitted lazily, once per
mode, at their first call. Two interpreter bugs of Triton 3.6 are worked around: scalar
``__index__`` under numpy >= 2.4 (triton-lang/triton#9171) and bf16 dots (tiles go to fp32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PATHS = ("absorb", "gqa")
MAX_SPLITS = 256
# largest padded widths the kernels accept (register / shared-memory budget of one tile)
MAX_LATENT = 1024
MAX_HEAD = 256


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set (kernels then run in Triton's CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ------------------------------------------------------------------------------------------
# kernels (plain functions, jitted lazily by _Kernel so that the interpreter choice is made at
# call time, not at import time). The two partial kernels share the helpers below (Triton
# inlines them): split range, page ids, cache row offsets, masked row loads, the flash step and
# the normalisation. The final stores stay inline: a store helper made ptxas spill more at the
# absorb tile's 255-register cap (offline sm_90 compile).
# ------------------------------------------------------------------------------------------
def _split_range(LENS, b, S, cap, nsplit, pid_p, BLOCK_N: tl.constexpr):
    """(cached length L, first key, end key) of split ``pid_p`` of sequence ``b``."""
    L = tl.load(LENS + b).to(tl.int32)
    n_keys = tl.minimum(L + S, cap)
    chunk = tl.cdiv(tl.cdiv(n_keys, nsplit), BLOCK_N) * BLOCK_N
    start = pid_p * chunk
    return L, start, tl.minimum(start + chunk, n_keys)


def _page_ids(BT, bt_row, n0, end, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Page ids of the key tile starting at n0 (0 past ``end``): one id when every tile lies in
    one page (PAGE % BLOCK_N == 0), else one per key. The kernels read them one iteration
    ahead, so the tile loads depend on a loop-carried value and Triton pipelines them as deep
    as contiguous tiles (offline sm_90 compile: 3 data stages instead of 2)."""
    if PAGE % BLOCK_N == 0:
        ids = tl.load(BT + bt_row + n0 // PAGE, mask=n0 < end, other=0)
    else:
        offs = n0 + tl.arange(0, BLOCK_N)
        ids = tl.load(BT + bt_row + offs // PAGE, mask=offs < end, other=0)
    return ids.to(tl.int64)


def _row_offsets(page, offs_n, b, s_0, s_1, PAGE: tl.constexpr, PAGED: tl.constexpr):
    """Element offsets of the cache rows of keys ``offs_n`` (dims 0, 1 of a cache tensor)."""
    if PAGED:
        return page * s_0 + (offs_n % PAGE).to(tl.int64) * s_1
    else:
        return b * s_0 + offs_n.to(tl.int64) * s_1


def _row_mask(rows_ok, offs, D: tl.constexpr, D_PAD: tl.constexpr):
    if D_PAD == D:
        return rows_ok[:, None]
    else:
        return rows_ok[:, None] & (offs < D)[None, :]


def _load_rows(PTR, row_off, offs, rows_ok, D: tl.constexpr, D_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """(rows, D_PAD) tile; rows not ok and columns >= D read as 0."""
    return tl.load(PTR + row_off[:, None] + offs[None, :], mask=_row_mask(rows_ok, offs, D, D_PAD),
                   other=0.0).to(DOT_DTYPE)


def _attend_tile(q, qr, k, kr, v, vis, m_i, l_i, acc, qk_scale, P_DTYPE: tl.constexpr,
                 DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One flash step over a key tile: scores q.k + qr.kr (masked by ``vis``), online softmax in
    base 2 (rows with nothing visible stay at 0), probabilities rounded to the cache dtype
    ``P_DTYPE`` for the PV product. Returns (acc, running max, running sum)."""
    sc = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    sc = tl.dot(qr, tl.trans(kr), sc, input_precision=DOT_PREC) * qk_scale
    sc = tl.where(vis, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(sc - m_use[:, None])
    acc = tl.dot(p.to(P_DTYPE).to(DOT_DTYPE), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


def _normalise(acc, m_i, l_i):
    """(output rows acc / l, their log-sum-exp in base 2; -inf for rows that saw no key)."""
    l_ok = l_i > 0.0
    l_div = tl.where(l_ok, l_i, 1.0)
    return acc / l_div[:, None], tl.where(l_ok, m_i + tl.log2(l_div), float("-inf"))


_HELPERS = (_split_range, _page_ids, _row_offsets, _row_mask, _load_rows, _attend_tile, _normalise)


def _absorb_partial_kernel(
        Q, QR, C, KR, BT, LENS, OPART, LSE, OUT,
        sq_b, sq_s, sq_h, sqr_b, sqr_s, sqr_h,
        sc_0, sc_1, skr_0, skr_1, sbt_b,
        sop_b, sop_m, sop_p, slse_b, slse_m,
        so_b, so_s, so_h,
        qk_scale, cap, nsplit, H, S,
        R: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, DR_PAD: tl.constexpr,
        PAGED: tl.constexpr, DIRECT: tl.constexpr, DOT_PREC: tl.constexpr,
        DOT_DTYPE: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    L, start, end = _split_range(LENS, b, S, cap, nsplit, pid_p, BLOCK_N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < H * S
    s_idx = offs_m // H
    h_idx = offs_m % H
    last = L + s_idx                      # row sees cache slots t <= last
    offs_r = tl.arange(0, R_PAD)
    offs_dr = tl.arange(0, DR_PAD)
    q = _load_rows(Q + b * sq_b, s_idx * sq_s + h_idx * sq_h, offs_r, row_ok, R, R_PAD, DOT_DTYPE)
    qr = _load_rows(QR + b * sqr_b, s_idx * sqr_s + h_idx * sqr_h, offs_dr, row_ok, DR, DR_PAD, DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, R_PAD], tl.float32)
    if PAGED:
        page_next = _page_ids(BT, b * sbt_b, start, end, PAGE, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if PAGED:
            page = page_next
            page_next = _page_ids(BT, b * sbt_b, n0 + BLOCK_N, end, PAGE, BLOCK_N)
        else:
            page = 0   # unused
        c = _load_rows(C, _row_offsets(page, offs_n, b, sc_0, sc_1, PAGE, PAGED), offs_r, n_ok,
                       R, R_PAD, DOT_DTYPE)
        kr = _load_rows(KR, _row_offsets(page, offs_n, b, skr_0, skr_1, PAGE, PAGED), offs_dr, n_ok,
                        DR, DR_PAD, DOT_DTYPE)
        acc, m_i, l_i = _attend_tile(q, qr, c, kr, c, (offs_n[None, :] <= last[:, None]) & n_ok[None, :],
                                     m_i, l_i, acc, qk_scale, C.dtype.element_ty, DOT_PREC, DOT_DTYPE)

    o, lse = _normalise(acc, m_i, l_i)
    omask = _row_mask(row_ok, offs_r, R, R_PAD)
    if DIRECT:
        tl.store(OUT + b * so_b + (s_idx * so_s + h_idx * so_h)[:, None] + offs_r[None, :],
                 o.to(OUT.dtype.element_ty), mask=omask)
    else:
        tl.store(OPART + b * sop_b + offs_m[:, None] * sop_m + pid_p * sop_p + offs_r[None, :], o, mask=omask)
        tl.store(LSE + b * slse_b + offs_m * slse_m + pid_p, lse, mask=row_ok)


def _gqa_partial_kernel(
        QN, QR, KN, V, KR, BT, LENS, OPART, LSE, OUT,
        sqn_b, sqn_s, sqn_h, sqr_b, sqr_s, sqr_h,
        skn_0, skn_1, skn_g, sv_0, sv_1, sv_g, skr_0, skr_1, sbt_b,
        sop_b, sop_m, sop_p, slse_b, slse_m,
        so_b, so_s, so_h,
        qk_scale, cap, nsplit, H, S, M, MBLOCKS,
        DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DN_PAD: tl.constexpr, DR_PAD: tl.constexpr, DV_PAD: tl.constexpr,
        PAGED: tl.constexpr, DIRECT: tl.constexpr, DOT_PREC: tl.constexpr,
        DOT_DTYPE: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_gm = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = pid_gm // MBLOCKS
    mb = pid_gm % MBLOCKS
    L, start, end = _split_range(LENS, b, S, cap, nsplit, pid_p, BLOCK_N)

    offs_i = mb * BLOCK_M + tl.arange(0, BLOCK_M)   # row within the group: s * M + j
    row_ok = offs_i < M * S
    s_idx = offs_i // M
    h_idx = g * M + offs_i % M
    m_glob = s_idx * H + h_idx                       # row of the partial buffers
    last = L + s_idx
    offs_dn = tl.arange(0, DN_PAD)
    offs_dr = tl.arange(0, DR_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    qn = _load_rows(QN + b * sqn_b, s_idx * sqn_s + h_idx * sqn_h, offs_dn, row_ok, DN, DN_PAD, DOT_DTYPE)
    qr = _load_rows(QR + b * sqr_b, s_idx * sqr_s + h_idx * sqr_h, offs_dr, row_ok, DR, DR_PAD, DOT_DTYPE)
    g64 = g.to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    if PAGED:
        page_next = _page_ids(BT, b * sbt_b, start, end, PAGE, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if PAGED:
            page = page_next
            page_next = _page_ids(BT, b * sbt_b, n0 + BLOCK_N, end, PAGE, BLOCK_N)
        else:
            page = 0   # unused
        kn = _load_rows(KN + g64 * skn_g, _row_offsets(page, offs_n, b, skn_0, skn_1, PAGE, PAGED),
                        offs_dn, n_ok, DN, DN_PAD, DOT_DTYPE)
        kr = _load_rows(KR, _row_offsets(page, offs_n, b, skr_0, skr_1, PAGE, PAGED), offs_dr, n_ok,
                        DR, DR_PAD, DOT_DTYPE)
        v = _load_rows(V + g64 * sv_g, _row_offsets(page, offs_n, b, sv_0, sv_1, PAGE, PAGED),
                       offs_dv, n_ok, DV, DV_PAD, DOT_DTYPE)
        acc, m_i, l_i = _attend_tile(qn, qr, kn, kr, v, (offs_n[None, :] <= last[:, None]) & n_ok[None, :],
                                     m_i, l_i, acc, qk_scale, V.dtype.element_ty, DOT_PREC, DOT_DTYPE)

    o, lse = _normalise(acc, m_i, l_i)
    omask = _row_mask(row_ok, offs_dv, DV, DV_PAD)
    if DIRECT:
        tl.store(OUT + b * so_b + (s_idx * so_s + h_idx * so_h)[:, None] + offs_dv[None, :],
                 o.to(OUT.dtype.element_ty), mask=omask)
    else:
        tl.store(OPART + b * sop_b + m_glob[:, None] * sop_m + pid_p * sop_p + offs_dv[None, :], o, mask=omask)
        tl.store(LSE + b * slse_b + m_glob * slse_m + pid_p, lse, mask=row_ok)


def _combine_kernel(
        OPART, LSE, OUT,
        sop_b, sop_m, sop_p, slse_b, slse_m, so_b, so_s, so_h, nsplit, H,
        DV: tl.constexpr, SPLIT_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
        BLOCK_DV: tl.constexpr, DISCARD: tl.constexpr):
    m = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    lse_base = LSE + b * slse_b + m * slse_m
    offs_p = tl.arange(0, SPLIT_PAD)
    lse = tl.load(lse_base + offs_p, mask=offs_p < nsplit, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    denom = tl.sum(tl.exp2(lse - mx), 0)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = offs_v < DV
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for p0 in range(0, nsplit, SPLIT_BLOCK):
        offs = p0 + tl.arange(0, SPLIT_BLOCK)
        p_ok = offs < nsplit
        w = tl.exp2(tl.load(lse_base + offs, mask=p_ok, other=float("-inf")) - mx)
        part = tl.load(OPART + b * sop_b + m * sop_m + offs[:, None] * sop_p + offs_v[None, :],
                       mask=p_ok[:, None] & v_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * part, 0)
    out = acc / tl.where(denom > 0.0, denom, 1.0)
    s = m // H
    h = m % H
    tl.store(OUT + b * so_b + s * so_s + h * so_h + offs_v, out.to(OUT.dtype.element_ty), mask=v_ok)
    if DISCARD:
        # the partials are dead once read: drop their L2 lines without writing them back to HBM
        # (each 128-byte line -- one row, one split, 32 columns -- is read by this program only;
        # _run_combine checks the alignment). All threads have used their loads: barrier first.
        tl.debug_barrier()
        lines = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV // 32) * 32
        for p0 in range(0, nsplit, SPLIT_BLOCK):
            offs = p0 + tl.arange(0, SPLIT_BLOCK)
            ok = (offs < nsplit)[:, None] & (lines < DV)[None, :]
            ptrs = OPART + b * sop_b + m * sop_m + offs[:, None] * sop_p + lines[None, :]
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p discard.global.L2 [$1], 128; mov.u32 $0, 0; }",
                "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter converts scalar tensors (numpy arrays of shape (1,)) to Python
    ints with int(array), which numpy >= 2.4 refuses, so ``range(start, end)`` over runtime
    bounds fails (triton-lang/triton#9171). Re-register ``__index__`` with a squeeze, inside the
    interpreter's own patch scope (undone after each kernel run like its other patches)."""
    from triton.runtime import interpreter as ti

    if getattr(ti, "_gqla_scalar_index_fix", False) or not hasattr(ti, "_patch_lang_tensor"):
        return
    original = ti._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
                       if self.handle.data.size == 1 else int(self.handle.data))

    ti._patch_lang_tensor = patched
    ti._gqla_scalar_index_fix = True


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of the tl.dot calls: the input dtype, except bf16 under the interpreter,
    whose dot multiplies bf16's raw uint16 storage (Triton 3.6); there the tiles go to fp32
    after rounding, which is the same arithmetic (bf16 products are exact in fp32)."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPES[dtype]


class _Kernel:
    """A kernel jitted on first use, once per mode (compiled vs TRITON_INTERPRET)."""

    def __init__(self, fn, do_not_specialize=()):
        self.fn = fn
        self.do_not_specialize = list(do_not_specialize)
        self._jit: Dict[bool, object] = {}

    def __getitem__(self, grid):
        mode = interpreting()
        k = self._jit.get(mode)
        if k is None:
            if mode:
                _fix_interpreter_scalar_index()
            _bind_helpers(mode)
            k = self._jit[mode] = triton.jit(self.fn, do_not_specialize=self.do_not_specialize)
        return k[grid]


_BOUND_MODE: List[bool] = []


def _bind_helpers(mode: bool) -> None:
    """Make the kernels' helper names (module globals they call) jitted functions of ``mode``.
    One mode per process: Triton records the globals a kernel used when it compiled it."""
    if _BOUND_MODE:
        if _BOUND_MODE[0] != mode:
            raise RuntimeError("the decode kernels ran both compiled and under TRITON_INTERPRET in "
                               "one process; set TRITON_INTERPRET before importing triton")
        return
    for fn in _HELPERS:
        globals()[fn.__name__] = triton.jit(fn)
    _BOUND_MODE.append(mode)


# sizes that vary per call stay runtime values (no recompilation per head count, s_q, length,
# number of splits); widths, tiles and layout flags are compile-time constants
_RUNTIME = ("cap", "nsplit", "H", "S", "M", "MBLOCKS")
_absorb_partial = _Kernel(_absorb_partial_kernel, _RUNTIME[:4])
_gqa_partial = _Kernel(_gqa_partial_kernel, _RUNTIME)
_combine = _Kernel(_combine_kernel, ("nsplit", "H"))


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeKernelConfig:
    """Launch parameters; None = environment variable, else the default (see module doc)."""

    block_m: Optional[int] = None
    """Query rows (heads x s_q) per tile; power of 2 >= 16. More rows -> several row blocks."""
    block_n: Optional[int] = None
    """KV tokens per loop iteration; power of 2 >= 16."""
    num_warps: Optional[int] = None
    """Warps per program of the partial kernel."""
    num_stages: Optional[int] = None
    """Software-pipelining stages of the KV loop."""
    num_splits: Optional[int] = None
    """KV splits per sequence (None: the ``choose_num_splits`` heuristic)."""
    min_chunk: Optional[int] = None
    """Heuristic: fewest keys of the longest sequence per split."""
    waves: Optional[float] = None
    """Heuristic: programs resident per SM at once (slots = waves x SMs; see choose_num_splits)."""


_FIELDS = [f.name for f in dataclasses.fields(DecodeKernelConfig)]


def default_config(path: str, rows: int, dtype: torch.dtype) -> DecodeKernelConfig:
    """Defaults per path. ``rows``: query rows of one (sequence[, group]) = heads x s_q.

    ``waves`` is the number of programs of the default tile that fit on one sm_90 SM at once
    (shared memory and registers of the compiled kernel; tests/cpu/test_triton_interpret.py
    checks each default against Triton's and ptxas's own figures), so the split heuristic
    plans whole waves of resident programs."""
    bm = min(64, max(16, _pow2(rows)))
    wide = dtype == torch.float32          # fp32 tiles take twice the shared memory
    if path == "absorb":
        # fp32 (IEEE dots run on FMA units, a correctness path): 32 x 16 tiles, else ptxas spills
        if wide:
            bm = min(bm, 32)
            return DecodeKernelConfig(block_m=bm, block_n=16, num_warps=4 if bm == 16 else 8,
                                      num_stages=1, num_splits=None, min_chunk=128, waves=1.0)
        if bm <= 32:
            # H200 sweep 3 (benchmarks/decode_kernels_h200/run4_occupancy): 32 x 32 tiles, 4
            # warps, 3 stages take 113 KB shared memory and 255 registers, so two programs share
            # an SM and one's loads overlap the other's softmax (B=128 L=8k s_q=1: 2.66 -> 2.95
            # TB/s over 32 x 64, 8 warps, one program per SM)
            return DecodeKernelConfig(block_m=bm, block_n=32, num_warps=4, num_stages=3,
                                      num_splits=None, min_chunk=128, waves=2.0)
        # 64 rows: 64 x 64 tiles, 8 warps, 2 stages (221 KB: one program per SM); no tile with
        # a 64 x 512 fp32 accumulator fits twice per SM
        return DecodeKernelConfig(block_m=bm, block_n=64, num_warps=8, num_stages=2,
                                  num_splits=None, min_chunk=128, waves=1.0)
    # gqa: 16-row tiles x 64 keys, 4 warps, 3 stages: 90 KB, two programs per SM (waves 2 took
    # B=8 L=32k from 88 to 95 % of the copy rate in sweep 3)
    if wide:
        return DecodeKernelConfig(block_m=bm, block_n=32, num_warps=8, num_stages=2,
                                  num_splits=None, min_chunk=64, waves=3.0)
    return DecodeKernelConfig(block_m=bm, block_n=64, num_warps=4, num_stages=3,
                              num_splits=None, min_chunk=64, waves=2.0)


def _env_value(path: str, field: str):
    key = f"GQLA_DECODE_{path.upper()}_{field.upper()}"
    raw = os.environ.get(key)
    if raw is None or raw.strip() == "":
        return None
    try:
        return float(raw) if field == "waves" else int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not a number") from None


def resolve_config(path: str, rows: int, dtype: torch.dtype,
                   config: Optional[DecodeKernelConfig] = None) -> Tuple[DecodeKernelConfig, bool]:
    """(fully resolved config, whether any tile/launch field was set explicitly)."""
    base = default_config(path, rows, dtype)
    vals, explicit = {}, False
    for f in _FIELDS:
        v = getattr(config, f) if config is not None else None
        if v is None:
            v = _env_value(path, f)
        if v is not None and f in ("block_m", "block_n", "num_warps", "num_stages"):
            explicit = True
        vals[f] = v if v is not None else getattr(base, f)
    cfg = DecodeKernelConfig(**vals)
    for f in ("block_m", "block_n"):
        v = getattr(cfg, f)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{f} must be a power of 2 >= 16, got {v}")
    for f in ("num_warps",):
        v = getattr(cfg, f)
        if v not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {v}")
    if cfg.num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {cfg.num_stages}")
    if cfg.num_splits is not None and not 1 <= cfg.num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {cfg.num_splits}")
    if cfg.min_chunk < 1:
        raise ValueError(f"min_chunk must be >= 1, got {cfg.min_chunk}")
    if not cfg.waves > 0:
        raise ValueError(f"waves must be > 0, got {cfg.waves}")
    return cfg, explicit


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 8 stands in for the CPU interpreter. Cached:
    the combine launch asks on every decode call."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def split_time(units: int, splits: int, slots: int) -> float:
    """Modelled time of a split grid, in units of one unsplit program: the waves of
    ``units * splits`` programs over ``slots``, each program doing 1/splits of the keys."""
    return -(-(units * splits) // slots) / splits


def split_time_tiles(units: int, splits: int, slots: int, max_len: int, block_n: int) -> float:
    """``split_time`` as the kernels split: each split's chunk is rounded up to whole
    ``block_n``-key tiles (``_split_range``), so ``splits`` can leave trailing splits empty and
    give the others more tiles (4096 keys in 31 splits: 22 programs of 3 tiles). In tiles per
    program times waves of the programs that have keys."""
    tiles = -(-max_len // block_n)
    chunk = -(-max_len // splits)                       # keys per split, before rounding
    per = -(-chunk // block_n)                          # tiles per program
    active = -(-tiles // per)
    return -(-(units * active) // slots) * per


def choose_num_splits(units: int, max_len: int, sms: int, *, waves: float, min_chunk: int,
                      block_n: int, tile_rounding: bool = False) -> int:
    """KV splits per sequence (see module docstring). ``units``: programs without splitting.

    slots = waves x SMs programs run at once. A grid that already fills 80 % of the slots is
    not split. Otherwise every split count up to the cap (each split keeps >= max(min_chunk,
    block_n) keys of the longest sequence, and <= MAX_SPLITS) is scored by ``split_time``
    (whole waves, so a mostly-empty last wave costs a full one), and the smallest count within
    5 % of the best score wins (fewer partial outputs to write and combine). E.g. 64 units on
    132 slots: 2 splits (128 programs, one wave), not 5 (320 programs, a third wave 42 % busy).
    ``tile_rounding``: score with ``split_time_tiles`` instead (the TileLang kernel, whose
    programs are few and long enough that a tile more or less each shows)."""
    slots = max(1, int(round(waves * sms)))
    if units >= 0.8 * slots or max_len <= 0:
        return 1
    cap = int(max(1, min(MAX_SPLITS, -(-max_len // max(min_chunk, block_n)))))
    if tile_rounding:
        times = [split_time_tiles(units, s, slots, max_len, block_n) for s in range(1, cap + 1)]
    else:
        times = [split_time(units, s, slots) for s in range(1, cap + 1)]
    best = min(times)
    return next(s for s, t in enumerate(times, start=1) if t <= 1.05 * best)


# ------------------------------------------------------------------------------------------
# capability checks
# ------------------------------------------------------------------------------------------
def device_problems(device: torch.device, dtype: torch.dtype) -> List[str]:
    """Why the kernels cannot run on (device, dtype); empty = they can."""
    out = []
    if dtype not in SUPPORTED_DTYPES:
        out.append(f"dtype {dtype} unsupported (kernels take bfloat16, float16, float32)")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            out.append("CUDA device requested but torch.cuda is not available")
        else:
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                out.append(f"GPU compute capability {major}.{minor} < 8.0 (needs Ampere or newer)")
    elif not interpreting():
        out.append(f"device {device.type} is not CUDA and TRITON_INTERPRET is not set (set "
                   f"TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter; slow, "
                   f"for tests)")
    return out


def shape_problems(path: str, *, heads: int, groups: int, kv_lora_rank: int, qk_head_dim: int,
                   rope_dim: int, v_head_dim: int) -> List[str]:
    """Why the kernel of ``path`` cannot take these shapes; empty = it can."""
    out = []
    if rope_dim > MAX_HEAD:
        out.append(f"RoPE dim {rope_dim} > {MAX_HEAD}")
    if path == "absorb":
        if kv_lora_rank > MAX_LATENT:
            out.append(f"kv_lora_rank {kv_lora_rank} > {MAX_LATENT} (one latent tile)")
    elif path == "gqa":
        if qk_head_dim > MAX_HEAD:
            out.append(f"qk_head_dim {qk_head_dim} > {MAX_HEAD}")
        if v_head_dim > MAX_HEAD:
            out.append(f"v_head_dim {v_head_dim} > {MAX_HEAD}")
        if heads % groups:
            out.append(f"groups {groups} do not divide heads {heads}")
    else:
        out.append(f"unknown path {path!r}")
    return out


# ------------------------------------------------------------------------------------------
# wrappers
# ------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")


def _cache_geometry(B: int, caches: List[Tuple[str, Tensor]], block_table: Optional[Tensor],
                    lengths: Tensor, device) -> Tuple[int, int]:
    """(capacity in tokens, page size; 0 = contiguous). Checks layouts of the cache tensors."""
    lead = {n: tuple(t.shape[:2]) for n, t in caches}
    if len(set(lead.values())) != 1:
        raise ValueError(f"cache tensors disagree on their two leading dims: {lead}")
    d0, d1 = next(iter(lead.values()))
    if block_table is None:
        if d0 != B:
            raise ValueError(f"contiguous caches must have batch {B} as dim 0, got {lead}")
        return d1, 0
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must be (B={B}, max_blocks), got "
                         f"{getattr(block_table, 'shape', type(block_table).__name__)}")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be int32 or int64, got {block_table.dtype}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device}, queries on {device}")
    if block_table.stride(-1) != 1:
        raise ValueError("block_table must be contiguous in its last dim")
    return block_table.shape[1] * d1, d1


def _validate_lengths(lengths: Tensor, S: int, cap: int, block_table: Optional[Tensor],
                      page: int, num_pages: int) -> None:
    """Host-side checks that need the values (one device sync)."""
    lens = lengths.detach().to("cpu", torch.int64)
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) + S > cap):
        raise ValueError(f"lengths + s_q must lie in [s_q, capacity {cap}]; got lengths in "
                         f"[{int(lens.min())}, {int(lens.max())}] with s_q={S}")
    if block_table is not None:
        bt = block_table.detach().to("cpu", torch.int64)
        for b, n in enumerate(lens.tolist()):
            used = bt[b, : -(-(n + S) // page)]
            if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_pages):
                raise ValueError(f"block_table row {b} uses page ids outside [0, {num_pages})")


_WORKING: Dict[tuple, DecodeKernelConfig] = {}
_WARNED = set()


def _shrink(cfg: DecodeKernelConfig) -> Optional[DecodeKernelConfig]:
    if cfg.num_stages > 1:
        return dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_n > 16:
        return dataclasses.replace(cfg, block_n=cfg.block_n // 2)
    if cfg.block_m > 16:
        return dataclasses.replace(cfg, block_m=cfg.block_m // 2)
    return None


def _launch_with_fallback(key: tuple, cfg: DecodeKernelConfig, explicit: bool, launch) -> DecodeKernelConfig:
    """Run ``launch(cfg)``; on a compile-time resource error shrink a default config and retry."""
    from triton.runtime.errors import OutOfResources

    if not explicit and key in _WORKING:
        cfg = dataclasses.replace(_WORKING[key], num_splits=cfg.num_splits)
    while True:
        try:
            launch(cfg)
            if not explicit:
                _WORKING[key] = cfg
            return cfg
        except OutOfResources as e:
            smaller = None if explicit else _shrink(cfg)
            if smaller is None:
                raise RuntimeError(f"decode kernel {key[0]} does not fit the GPU with {cfg}: {e}") from e
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(f"decode kernel {key[0]}: {cfg} ran out of resources ({e}); "
                              f"retrying with {smaller}")
            cfg = smaller


def combine_block(B: int, rows: int, DV: int, nsplit: int, sms: int) -> Tuple[int, int]:
    """(column block, splits per pass) of the combine pass: the widest column block that still
    gives about 2 programs per SM (whole 512-wide rows at B >= 32: a quarter of the programs of
    128-wide blocks, and 1.1-1.2x the whole absorb call at B=32 x 8k; narrower at small B, which
    is latency-bound), and at most 8192 partial values per pass (64 fp32 registers per thread)."""
    block_dv = _pow2(DV)
    while block_dv > 32 and B * rows * triton.cdiv(DV, block_dv) < 2 * sms:
        block_dv //= 2
    split_pad = _pow2(nsplit)
    return block_dv, max(1, min(64, split_pad, 8192 // block_dv))


COMBINE_DISCARD = os.environ.get("GQLA_DECODE_COMBINE_DISCARD", "0") == "1"
"""The combine pass discards the partials' L2 lines after reading them (``discard.global.L2``,
sm_80+), so the dirty lines are not written back to HBM while the next kernel streams its cache.
Off by default: measured (H200, benchmarks/decode_kernels_h200/experiments/combine_discard)
1.01-1.03x per layer in the bandwidth-bound split cells (layers back to back in one graph), but
0.98-1.00x as single calls and at B = 1 -- too small and mixed to change the default for."""


def discard_ok(opart: Tensor, DV: int) -> bool:
    """Whether the partial buffer's 128-byte lines each hold one row's, one split's 32 columns --
    the condition for the combine to discard them (no line shared between programs)."""
    return (COMBINE_DISCARD and not interpreting() and opart.is_cuda and DV % 32 == 0
            and opart.stride(-1) == 1 and opart.data_ptr() % 128 == 0
            and all(st % 32 == 0 for st in opart.stride()[:-1]))


def _run_combine(opart, lse, out, H, DV, nsplit, device) -> None:
    B, rows = lse.shape[0], lse.shape[1]
    block_dv, split_block = combine_block(B, rows, DV, nsplit, num_sms(device))
    grid = (rows, triton.cdiv(DV, block_dv), B)
    _combine[grid](opart, lse, out,
                   opart.stride(0), opart.stride(1), opart.stride(2), lse.stride(0), lse.stride(1),
                   out.stride(0), out.stride(1), out.stride(2), nsplit, H,
                   DV=DV, SPLIT_PAD=_pow2(nsplit), SPLIT_BLOCK=split_block, BLOCK_DV=block_dv,
                   DISCARD=discard_ok(opart, DV), num_warps=4, num_stages=1)


@dataclass(frozen=True)
class DecodePlan:
    """What one call launches (for reports and sweeps)."""

    path: str
    config: DecodeKernelConfig
    num_splits: int
    row_blocks: int
    grid: Tuple[int, int, int]
    explicit: bool = False
    """Whether a tile/launch field was set explicitly (no out-of-resources fallback then)."""


_PLANS: Dict[tuple, DecodePlan] = {}


def _env_snapshot(path: str) -> tuple:
    return tuple(os.environ.get(f"GQLA_DECODE_{path.upper()}_{f.upper()}") for f in _FIELDS)


def plan_decode(path: str, *, batch: int, s_q: int, heads: int, groups: int, max_len: int,
                dtype: torch.dtype, device, config: Optional[DecodeKernelConfig] = None) -> DecodePlan:
    """Resolve the config and the number of splits for one call (no launch). Cached per
    (shapes, config, GQLA_DECODE_* values): repeated decode steps do no host work here."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    key = (path, batch, s_q, heads, groups, max_len, dtype, str(device), config, _env_snapshot(path))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 4096:   # e.g. an engine passing a growing max_len: stay bounded
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(path, batch, s_q, heads, groups, max_len, dtype,
                                        num_sms(torch.device(device)), config)
    return plan


def _make_plan(path, batch, s_q, heads, groups, max_len, dtype, sms, config) -> DecodePlan:
    """``plan_decode`` without the cache, for ``sms`` streaming multiprocessors (pure: the
    warm-up planner calls it too, so both see the same configs and split counts)."""
    rows = heads * s_q if path == "absorb" else (heads // groups) * s_q
    cfg, explicit = resolve_config(path, rows, dtype, config)
    row_blocks = triton.cdiv(rows, cfg.block_m)
    units = batch * row_blocks * (1 if path == "absorb" else groups)
    nsplit = cfg.num_splits or choose_num_splits(units, max_len, sms, waves=cfg.waves,
                                                 min_chunk=cfg.min_chunk, block_n=cfg.block_n)
    cfg = dataclasses.replace(cfg, num_splits=nsplit)
    grid = (nsplit, row_blocks * (1 if path == "absorb" else groups), batch)
    return DecodePlan(path, cfg, nsplit, row_blocks, grid, explicit)


# ------------------------------------------------------------------------------------------
# warm-up planning
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WarmupCall:
    """One decode call a load-time warm-up runs, standing for every call of its launch
    configuration (see ``warmup_plan``)."""

    batch: int
    """Sequences in the call (the smallest batch of its configuration)."""
    s_q: int
    """Query tokens per sequence."""
    num_splits: int
    """KV splits; 1 = the partial kernel writes the output directly (no combine pass)."""
    combine: Optional[Tuple[int, int, int]]
    """The combine pass's (BLOCK_DV, SPLIT_PAD, SPLIT_BLOCK); None without a combine pass."""


def warmup_plan(path: str, *, max_batch: int, s_q: Sequence[int], heads: int, groups: int,
                width: int, max_len: int, dtype: torch.dtype, sms: int,
                runs: Optional[Callable[[int, int], bool]] = None,
                splits: Optional[Callable[[int, int], int]] = None) -> List[WarmupCall]:
    """The calls that compile, between them, every kernel variant that decode calls of 1 ..
    ``max_batch`` sequences x each ``s_q`` will launch (eager steps take any batch; CUDA-graph
    buckets are among them), so a load-time warm-up can run them on dummy inputs.

    Triton compiles one variant per distinct set of constexprs and argument specialisations:
    the constexprs are fixed per model (widths, dtype, layout) except the tile (from heads x
    s_q), DIRECT (one split) and the combine pass's BLOCK_DV / SPLIT_PAD / SPLIT_BLOCK (from
    batch, rows and the split count); integer arguments outside ``_RUNTIME`` are specialised on
    == 1 and % 16 -- the partial buffers' strides depend on the split count, and torch may
    stride the size-1 batch dim of a batch of one's queries differently -- and pointers on
    16-byte alignment (fresh allocations in every call). So the key is (s_q, splits, combine
    constexprs, batch == 1), taken over every batch rather than a sample, with the split count
    from the decode call's own ``_make_plan`` (config, GQLA_DECODE_* overrides, heuristic) at
    ``max_len`` and ``sms`` SMs: a variant left out costs a multi-second compile inside a
    decode step, an extra call a few microseconds at load.
    ``width``: the output width (kv_lora_rank for absorb, v_head_dim for gqa). ``runs(batch,
    s_q)``: False for calls another kernel serves (tilelang_absorb). ``splits(batch, s_q)``: the
    split count of a call when another kernel makes the split calls that this module's combine
    pass merges (default: this module's plan). Pure (no GPU query)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    for name, v in (("max_batch", max_batch), ("heads", heads), ("groups", groups), ("width", width),
                    ("sms", sms)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not s_q or min(s_q) < 1:
        raise ValueError(f"s_q must be a non-empty list of query counts >= 1, got {tuple(s_q)}")
    calls, seen = [], set()
    for S in sorted(set(s_q)):
        for B in range(1, max_batch + 1):
            if runs is not None and not runs(B, S):
                continue
            n = (splits(B, S) if splits is not None
                 else _make_plan(path, B, S, heads, groups, max_len, dtype, sms, None).num_splits)
            combine = None
            if n > 1:
                block_dv, split_block = combine_block(B, heads * S, width, n, sms)
                combine = (block_dv, _pow2(n), split_block)
            key = (S, n, combine, B == 1)
            if key not in seen:
                seen.add(key)
                calls.append(WarmupCall(B, S, n, combine))
    return calls


def _common_checks(q: Tensor, q_rope: Tensor, lengths: Tensor, names=("q", "q_rope")):
    _check_tensor(names[0], q, 4)
    _check_tensor(names[1], q_rope, 4)
    B, S, H, _ = q.shape
    if tuple(q_rope.shape[:3]) != (B, S, H):
        raise ValueError(f"{names[1]} must be (B, S, H, d_r) = ({B}, {S}, {H}, .), got {tuple(q_rope.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{names[0]} dtype {q.dtype} unsupported (bfloat16, float16, float32)")
    if q_rope.dtype != q.dtype:
        raise ValueError(f"{names[1]} dtype {q_rope.dtype} differs from {names[0]} dtype {q.dtype}")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be an int32/int64 tensor of shape ({B},), got "
                         f"{getattr(lengths, 'shape', None)} {getattr(lengths, 'dtype', None)}")
    for n, t in ((names[1], q_rope), ("lengths", lengths)):
        if t.device != q.device:
            raise ValueError(f"{n} is on {t.device}, {names[0]} on {q.device}")
    if S < 1 or H < 1:
        raise ValueError(f"need s_q >= 1 and heads >= 1, got shape {tuple(q.shape)}")
    return B, S, H


def _out_buffer(out, shape, dtype, device):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    _check_tensor("out", out, 4)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be {tuple(shape)} {dtype} on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def check_absorb_inputs(q_abs: Tensor, q_rope: Tensor, c: Tensor, k_rope: Tensor, lengths: Tensor):
    """Ranks, widths, dtypes and devices of an absorb call (shared with the TileLang kernel);
    returns (B, S, H, r, d_r)."""
    B, S, H = _common_checks(q_abs, q_rope, lengths, ("q_abs", "q_rope"))
    R, DR = q_abs.shape[3], q_rope.shape[3]
    _check_tensor("c", c, 3)
    _check_tensor("k_rope", k_rope, 3)
    if c.shape[2] != R or k_rope.shape[2] != DR:
        raise ValueError(f"cache widths c {c.shape[2]}, k_rope {k_rope.shape[2]} must match the "
                         f"query widths r={R}, d_r={DR}")
    for n, t in (("c", c), ("k_rope", k_rope)):
        if t.dtype != q_abs.dtype:
            raise ValueError(f"{n} dtype {t.dtype} differs from q_abs dtype {q_abs.dtype}")
        if t.device != q_abs.device:
            raise ValueError(f"{n} is on {t.device}, q_abs on {q_abs.device}")
    return B, S, H, R, DR


def absorb_decode(q_abs: Tensor, q_rope: Tensor, c: Tensor, k_rope: Tensor, lengths: Tensor,
                  softmax_scale: float, *, block_table: Optional[Tensor] = None,
                  out: Optional[Tensor] = None, config: Optional[DecodeKernelConfig] = None,
                  max_len: Optional[int] = None, validate: bool = True) -> Tensor:
    """MQA-absorb decode attention over the latent cache; returns the latent output o_lat
    (B, S, H, r) in q_abs's dtype (apply W_UV per group afterwards).

    q_abs (B, S, H, r): W_UK-folded queries; q_rope (B, S, H, d_r); c (B, T, r) and
    k_rope (B, T, d_r), or pages (num_blocks, block_size, .) with ``block_table``;
    lengths (B,) int: cached tokens before the S new ones (whose K/V are already stored).
    ``max_len``: longest lengths[b] + S for the split heuristic (default: capacity).
    ``validate``: check lengths / page ids against the cache on the host (one sync)."""
    B, S, H, R, DR = check_absorb_inputs(q_abs, q_rope, c, k_rope, lengths)
    problems = shape_problems("absorb", heads=H, groups=1, kv_lora_rank=R, qk_head_dim=1,
                              rope_dim=DR, v_head_dim=R)
    if problems:
        raise ValueError("absorb kernel: " + "; ".join(problems))
    cap, page = _cache_geometry(B, [("c", c), ("k_rope", k_rope)], block_table, lengths, q_abs.device)
    if validate:
        _validate_lengths(lengths, S, cap, block_table, page, c.shape[0])
    out = _out_buffer(out, (B, S, H, R), q_abs.dtype, q_abs.device)
    if B == 0 or cap == 0:
        return out.zero_()
    plan = plan_decode("absorb", batch=B, s_q=S, heads=H, groups=1, max_len=max_len or cap,
                       dtype=q_abs.dtype, device=q_abs.device, config=config)
    explicit = plan.explicit
    nsplit = plan.num_splits
    direct = nsplit == 1
    if direct:
        opart, lse = out, out   # unused placeholders
    else:
        opart = torch.empty(B, S * H, nsplit, R, dtype=torch.float32, device=q_abs.device)
        lse = torch.empty(B, S * H, nsplit, dtype=torch.float32, device=q_abs.device)
    bt = block_table if block_table is not None else lengths
    sbt = block_table.stride(0) if block_table is not None else 0
    qk_scale = float(softmax_scale) * math.log2(math.e)
    prec = "ieee" if q_abs.dtype == torch.float32 else None

    def launch(cfg: DecodeKernelConfig):
        rb = triton.cdiv(H * S, cfg.block_m)
        _absorb_partial[(nsplit, rb, B)](
            q_abs, q_rope, c, k_rope, bt, lengths, opart, lse, out,
            q_abs.stride(0), q_abs.stride(1), q_abs.stride(2),
            q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
            c.stride(0), c.stride(1), k_rope.stride(0), k_rope.stride(1), sbt,
            opart.stride(0), opart.stride(1), opart.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            qk_scale, cap, nsplit, H, S,
            R=R, DR=DR, PAGE=max(page, 1),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=max(16, _pow2(R)), DR_PAD=max(16, _pow2(DR)),
            PAGED=block_table is not None, DIRECT=direct, DOT_PREC=prec, DOT_DTYPE=_dot_dtype(q_abs.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    key = ("absorb", q_abs.dtype, H, S, R, DR, block_table is not None, str(q_abs.device))
    _launch_with_fallback(key, plan.config, explicit, launch)
    if not direct:
        _run_combine(opart, lse, out, H, R, nsplit, q_abs.device)
    return out


def gqa_decode(q_nope: Tensor, q_rope: Tensor, k_nope: Tensor, v: Tensor, k_rope: Tensor,
               lengths: Tensor, softmax_scale: float, *, block_table: Optional[Tensor] = None,
               out: Optional[Tensor] = None, config: Optional[DecodeKernelConfig] = None,
               max_len: Optional[int] = None, validate: bool = True) -> Tensor:
    """GQA-path decode attention; returns o (B, S, H, d_v) in q_nope's dtype.

    q_nope (B, S, H, d_n), q_rope (B, S, H, d_r); k_nope (B, T, G, d_n), v (B, T, G, d_v),
    k_rope (B, T, d_r) (RoPE key once per token, shared by all groups), or pages
    (num_blocks, block_size, ...) with ``block_table``. Head h belongs to group h // (H / G).
    Other arguments as ``absorb_decode``."""
    B, S, H = _common_checks(q_nope, q_rope, lengths, ("q_nope", "q_rope"))
    DN, DR = q_nope.shape[3], q_rope.shape[3]
    _check_tensor("k_nope", k_nope, 4)
    _check_tensor("v", v, 4)
    _check_tensor("k_rope", k_rope, 3)
    G, DV = k_nope.shape[2], v.shape[3]
    if v.shape[2] != G:
        raise ValueError(f"k_nope has {G} groups, v has {v.shape[2]}")
    if k_nope.shape[3] != DN or k_rope.shape[2] != DR:
        raise ValueError(f"cache widths k_nope {k_nope.shape[3]}, k_rope {k_rope.shape[2]} must "
                         f"match the query widths d_n={DN}, d_r={DR}")
    for n, t in (("k_nope", k_nope), ("v", v), ("k_rope", k_rope)):
        if t.dtype != q_nope.dtype:
            raise ValueError(f"{n} dtype {t.dtype} differs from q_nope dtype {q_nope.dtype}")
        if t.device != q_nope.device:
            raise ValueError(f"{n} is on {t.device}, q_nope on {q_nope.device}")
    problems = shape_problems("gqa", heads=H, groups=G, kv_lora_rank=1, qk_head_dim=DN,
                              rope_dim=DR, v_head_dim=DV)
    if problems:
        raise ValueError("gqa kernel: " + "; ".join(problems))
    cap, page = _cache_geometry(B, [("k_nope", k_nope), ("v", v), ("k_rope", k_rope)], block_table,
                                lengths, q_nope.device)
    if validate:
        _validate_lengths(lengths, S, cap, block_table, page, k_nope.shape[0])
    out = _out_buffer(out, (B, S, H, DV), q_nope.dtype, q_nope.device)
    if B == 0 or cap == 0:
        return out.zero_()
    M = H // G
    plan = plan_decode("gqa", batch=B, s_q=S, heads=H, groups=G, max_len=max_len or cap,
                       dtype=q_nope.dtype, device=q_nope.device, config=config)
    explicit = plan.explicit
    nsplit = plan.num_splits
    direct = nsplit == 1
    if direct:
        opart, lse = out, out
    else:
        opart = torch.empty(B, S * H, nsplit, DV, dtype=torch.float32, device=q_nope.device)
        lse = torch.empty(B, S * H, nsplit, dtype=torch.float32, device=q_nope.device)
    bt = block_table if block_table is not None else lengths
    sbt = block_table.stride(0) if block_table is not None else 0
    qk_scale = float(softmax_scale) * math.log2(math.e)
    prec = "ieee" if q_nope.dtype == torch.float32 else None

    def launch(cfg: DecodeKernelConfig):
        mblocks = triton.cdiv(M * S, cfg.block_m)
        _gqa_partial[(nsplit, G * mblocks, B)](
            q_nope, q_rope, k_nope, v, k_rope, bt, lengths, opart, lse, out,
            q_nope.stride(0), q_nope.stride(1), q_nope.stride(2),
            q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
            k_nope.stride(0), k_nope.stride(1), k_nope.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            k_rope.stride(0), k_rope.stride(1), sbt,
            opart.stride(0), opart.stride(1), opart.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            qk_scale, cap, nsplit, H, S, M, mblocks,
            DN=DN, DR=DR, DV=DV, PAGE=max(page, 1),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            DN_PAD=max(16, _pow2(DN)), DR_PAD=max(16, _pow2(DR)), DV_PAD=max(16, _pow2(DV)),
            PAGED=block_table is not None, DIRECT=direct, DOT_PREC=prec, DOT_DTYPE=_dot_dtype(q_nope.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    key = ("gqa", q_nope.dtype, H, G, S, DN, DR, DV, block_table is not None, str(q_nope.device))
    _launch_with_fallback(key, plan.config, explicit, launch)
    if not direct:
        _run_combine(opart, lse, out, H, DV, nsplit, q_nope.device)
    return out
