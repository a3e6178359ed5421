"""TileLang absorb-path decode kernel for Hopper (sm_90): warp-specialised, TMA + wgmma.

Same contract as ``triton_decode.absorb_decode`` (see that module for the maths, the cache
layouts and the split-KV scheme); this kernel differs in how one program runs on the GPU:

* one program = 64 query rows (heads x s_q of one sequence; fewer rows are padded to 64, the
  smallest Hopper ``wgmma`` tile) x one KV split; 64-token latent tiles;
* three warpgroups with fixed roles and explicit mbarrier handshakes (``build_absorb_program``
  has the details): a producer issues TMA loads of each latent tile (left and right halves of c,
  64 x r/2 each, and the RoPE key tile, 64 x d_r) into a 2-buffer ring; a "scores" warpgroup runs
  the whole 64 x 64 score tile (three ``wgmma`` issued back to back, one wait), the mask, the
  online softmax and its half of P.c (64 x r/2 fp32 accumulator, 128 registers per thread); a
  "right" warpgroup runs the other half of P.c. While "right" finishes tile t, "scores" is already
  on tile t + 1 (the schedule FlashMLA uses). It replaced (session 5) a version whose roles
  TileLang derived automatically: 1.03-1.08x that one from 128k cached tokens on, 1.01-1.12x at
  128 heads, 0.94-0.96x at B = 1 x 32k (benchmarks/decode_kernels_h200/run11_tilelang_ws). Session
  6 cut the scores warpgroup's per-tile scalar work (mask, scale, select): 1.1-1.4x again, the
  large memory-bound cells at 97-104 % of the copy rate and 128 heads at 71-75 % of the matmul
  rate (run14_l2_flush). Session 7 cut the output stores (~7 us per program, experiments/
  timeline): 1 / l once per row, the direct output staged through shared memory, split partials
  stored from the accumulator -- 1.05-1.10x at 32 tiles per program (experiments/epilogue_ab,
  epilogue_split_ab);
* the latent tile is loaded once and read twice (as K^T for the scores and as V for the output).

Split partial outputs use the Triton module's layout and its combine kernel (``_run_combine``),
and the split count comes from its ``choose_num_splits`` with ``waves = 1`` (one 384-thread,
~216 KB program per SM).

Limits (checked by ``absorb_problems`` and the wrapper): sm_90 (``wgmma``/TMA), bf16 or fp16,
r = 512 and d_r = 64 (the widths compiled, tested and measured; the shared memory is planned for
them -- other widths use the Triton kernel), contiguous caches with a contiguous last dim and
16-byte aligned strides and start (TMA), or paged caches whose page size is a multiple of 64 (one
tile = part of one page). Cache slots past a sequence's length inside its last 64-token tile are loaded (TMA
moves whole tiles) but masked: their scores are -inf and their latent rows are zeroed in shared
memory before the P.V product, so stale or NaN slots never reach the output.

TileLang compiles a kernel per (r, d_r, dtype, lengths dtype, page size, direct); batch, rows
(heads x s_q), capacity, page count and split count are runtime values, so a serving process
compiles two kernels (split + direct) once (seconds each, cached on disk by TileLang).
"""


# no "from __future__ import annotations": TileLang evaluates the prim_func annotations
# (tensor shapes built from closure variables) at definition time
import functools
import math
from typing import List, Optional

import torch
from torch import Tensor

BLOCK_M = 64
BLOCK_N = 64
THREADS = 384       # producer warpgroup + "scores" warpgroup + "right" warpgroup
WAVES = 1.0         # programs resident per SM (shared memory: ~216 KB each)
# keys per split at least: one 64-token tile where a program has <= 32 query rows (its 64-row tile
# half empty), two tiles with 33-64 rows (session 8, experiments/splits_per_layer runs 1-2)
MIN_CHUNK, MIN_CHUNK_FULL_ROWS = 64, 128
# where the Triton kernel is as fast or faster (H200; benchmarks/decode_kernels_h200/experiments/
# tilelang_16_rows run 2, session 7, after the staged epilogue made short programs cheaper): every
# TileLang program computes 64 query rows; with 32 or more rows per sequence (heads x s_q)
# TileLang measured 1.03-1.51x Triton in every cell from 1k cached tokens (B x max_len) on except
# one at 0.99x (B=16 x 1k); with 16-31 rows 1.07-1.20x from 256k tokens, 0.94-1.07x below
# (1.01-1.18x at 128k); under 16 rows it is not measured and not used. (Session 6, before the
# epilogue change: 32+ rows from 32k, 16-31 rows from 512k.)
MIN_ROWS = 16
MIN_TOKENS = 1024
FEW_ROWS, MIN_TOKENS_FEW_ROWS = 32, 262144
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def import_problem() -> Optional[str]:
    """Why tilelang cannot be imported here (None when it can)."""
    try:
        import tilelang  # noqa: F401
        import tilelang.language  # noqa: F401
    except Exception as e:  # ImportError, or a missing shared library (libz3, libcuda)
        return (f"tilelang not importable ({type(e).__name__}: {str(e).splitlines()[0][:120]}; "
                f"pip install -e .[tilelang])")
    return None


def absorb_problems(device, dtype: torch.dtype, *, kv_lora_rank: int, rope_dim: int) -> List[str]:
    """Why this kernel cannot run for (device, dtype, shapes); empty = it can."""
    out = []
    p = import_problem()
    if p:
        out.append(p)
    if dtype not in SUPPORTED_DTYPES:
        out.append(f"dtype {dtype} unsupported (bfloat16 or float16)")
    device = torch.device(device)
    if device.type != "cuda":
        out.append(f"device {device.type} is not CUDA (warp-specialised wgmma kernel)")
    elif not torch.cuda.is_available():
        out.append("CUDA device requested but torch.cuda is not available")
    else:
        cc = torch.cuda.get_device_capability(device)
        if cc != (9, 0):
            out.append(f"GPU compute capability {cc[0]}.{cc[1]} is not 9.0 (Hopper wgmma + TMA)")
    if kv_lora_rank != 512:
        out.append(f"kv_lora_rank {kv_lora_rank} != 512 (the one width this kernel is built, "
                   f"tested and measured for)")
    if rope_dim != 64:
        out.append(f"rope dim {rope_dim} != 64 (the one width this kernel is built, tested and "
                   f"measured for)")
    return out


def _paging_problem(page: int, block_table: Optional[Tensor]) -> Optional[str]:
    """Why this kernel cannot read a cache with these pages (None = it can): a tile must lie in
    one page, and the kernel takes an int32 block table."""
    if page and page % BLOCK_N:
        return f"page size {page} must be a multiple of {BLOCK_N} for the tilelang kernel"
    if block_table is not None and block_table.dtype != torch.int32:
        return "block_table must be int32 for the tilelang kernel"
    return None


def prefers(batch: int, rows: int, max_len: int, page: int, len_dtype: torch.dtype = torch.int32,
            block_table: Optional[Tensor] = None) -> bool:
    """Whether to run this kernel rather than the Triton one for a call of these sizes (rows =
    heads x s_q per sequence). A fixed answer per shape keeps CUDA-graph capture valid."""
    if rows < MIN_ROWS or _paging_problem(page, block_table) is not None:
        return False
    need = MIN_TOKENS_FEW_ROWS if rows < FEW_ROWS else MIN_TOKENS
    return len_dtype in (torch.int32, torch.int64) and batch * max_len >= need


def plan_splits(batch: int, rows: int, max_len: int, device) -> int:
    """KV splits per sequence for a call (the Triton module's heuristic at one program per SM)."""
    from . import triton_decode as td

    return splits_for(batch, rows, max_len, td.num_sms(torch.device(device)))


def splits_for(batch: int, rows: int, max_len: int, sms: int) -> int:
    """``plan_splits`` for a GPU of ``sms`` SMs (pure: the warm-up planner uses it too).

    Up to 32 query rows per program: splits scored in whole tiles per program
    (``tile_rounding``) and down to one tile per program. The Triton rule (two tiles at least,
    rounding ignored) gave B = 1 x 4096 keys 31 splits, of which 22 got keys, 3 tiles each; 64
    splits of one tile measured 1.22x per layer, and the new rule 1.04-1.23x at B = 1, 1.05-1.10x
    at B = 2, 1.00-1.06x at B = 4 (benchmarks/decode_kernels_h200/experiments/splits_per_layer).
    With 33-64 rows per program (s_q 2, 128 heads) one-tile programs measured 0.90-0.98x (twice
    the partials, a full tile of work each), so those keep the Triton rule."""
    from . import triton_decode as td

    units = batch * -(-rows // BLOCK_M)
    few = min(rows, BLOCK_M) <= 32
    return td.choose_num_splits(units, max_len, sms, waves=WAVES, min_chunk=MIN_CHUNK if few else MIN_CHUNK_FULL_ROWS,
                                block_n=BLOCK_N, tile_rounding=few)


def warmup_plan(path: str, *, max_batch: int, s_q, heads: int, groups: int, width: int, max_len: int,
                dtype: torch.dtype, sms: int, runs=None) -> list:
    """The calls that launch, between them, every Triton combine variant the split calls of this
    kernel for 1 .. ``max_batch`` sequences x each ``s_q`` will use (``runs(batch, s_q)``: the
    calls this kernel serves, i.e. ``prefers``). The partial kernel itself is compiled per
    ``kernel_args`` (``compile_absorb``), but its split outputs are merged by the Triton module's
    combine kernel, whose constexprs and integer specialisations follow (batch, rows, splits):
    ``triton_decode.warmup_plan`` with this kernel's split count. Same signature as that
    function. Pure (no GPU query)."""
    from . import triton_decode as td

    if path != "absorb":
        raise ValueError(f"path must be 'absorb' for the tilelang kernel, got {path!r}")
    return td.warmup_plan(path, max_batch=max_batch, s_q=s_q, heads=heads, groups=groups, width=width,
                          max_len=max_len, dtype=dtype, sms=sms, runs=runs,
                          splits=lambda B, S: splits_for(B, heads * S, max_len, sms))


def _tma_ok(t: Tensor) -> bool:
    """Whether a 3-D tensor can back a TMA descriptor: unit last stride, other strides and the
    start address multiples of 16 bytes."""
    e = t.element_size()
    return (t.stride(2) == 1 and (t.stride(1) * e) % 16 == 0 and (t.stride(0) * e) % 16 == 0
            and t.data_ptr() % 16 == 0)


def _tl_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.int32: "int32",
            torch.int64: "int64"}[dtype]


def build_absorb_program(*, r: int, dr: int, dtype: str, len_dtype: str, page: int, direct: bool):
    """The TileLang prim_func of the partial (or, ``direct``, the final) absorb kernel.

    Runtime sizes: batch B, ROWS = heads x s_q query rows per sequence (row m = s * heads + h;
    ``heads`` is a scalar argument), cache capacity / page count, block-table width, splits.
    ``page`` 0 = contiguous caches (B, T, .), else a page pool (num_pages, page, .) with a block
    table (B, max_pages).

    Roles (384 threads; explicit mbarriers, one phase per tile or per pair of tiles):
      producer (threads 256-383): TMA loads of the query tile once, then of each 64-token latent
        tile as a left half (64 x r/2), a right half and the RoPE key tile into a 2-buffer ring
        (tile t -> buffer t % 2), refilling a buffer once both consumers released it;
      scores (threads 0-127): the whole 64 x 64 score tile (three wgmma issued back to back, one
        wait), the mask, the online softmax, P and its rescale factor to shared memory, then its
        half of the output, O[:, :r/2] += P . c[:, :r/2]. Its per-tile scalar work is on the
        kernel's critical path, so it is kept small: each row's key limit is computed once, tiles
        that every row sees whole skip the mask, and the softmax scale is folded into exp2 (one
        FMA per element, no select) -- together 1.1-1.4x the session-5 kernel
        (benchmarks/decode_kernels_h200/experiments/tilelang_softmax_variants, runs 1-2);
      right (threads 128-255): waits for P, rescales and adds P . c[:, r/2:] to its half.
    While "right" runs its P.V of tile t, "scores" runs the score products and softmax of tile
    t + 1 (it waits for "right" to free P only before overwriting it).
    Stale latent rows past the split end are zeroed by "scores" after its score products and
    before it publishes P (so before either P.V product reads them; async-proxy fence)."""
    import tilelang.language as T

    BM, BN = BLOCK_M, BLOCK_N
    H2 = r // 2
    acc = "float32"
    NEG = -T.infinity(acc)
    paged = page > 0
    if paged and page % BN:
        raise ValueError(f"page size {page} must be a multiple of the {BN}-token tile")
    B = T.dynamic("B")
    rows = T.dynamic("ROWS")
    NSPLIT = T.dynamic("NSPLIT")
    TC = T.dynamic("TC")          # contiguous: capacity; paged: pages in the pool
    MAXP = T.dynamic("MAXP")      # paged: block-table width
    cache_rows = page if paged else TC
    cache_lead = TC if paged else B

    @T.macro
    def load_tile(C, KR, BT, b, k0, K_l, K_r, K_pe, bars, s):
        if paged:
            pg = BT[b, k0 // page]
            T.tma_copy(C[pg, k0 % page:k0 % page + BN, 0:H2], K_l, barrier=bars[s])
            T.tma_copy(C[pg, k0 % page:k0 % page + BN, H2:r], K_r, barrier=bars[s])
            T.tma_copy(KR[pg, k0 % page:k0 % page + BN, :], K_pe, barrier=bars[s])
        else:
            T.tma_copy(C[b, k0:k0 + BN, 0:H2], K_l, barrier=bars[s])
            T.tma_copy(C[b, k0:k0 + BN, H2:r], K_r, barrier=bars[s])
            T.tma_copy(KR[b, k0:k0 + BN, :], K_pe, barrier=bars[s])
        T.barrier_arrive(bars[s])

    @T.macro
    def qk_issue(Q_l, Q_r, Q_pe, K_l, K_r, K_pe, acc_s):
        T.clear(acc_s)
        T.wgmma_gemm(Q_l, K_l, acc_s, transpose_B=True)
        T.wgmma_gemm(Q_r, K_r, acc_s, transpose_B=True)
        T.wgmma_gemm(Q_pe, K_pe, acc_s, transpose_B=True)

    @T.macro
    def qk_fix(K_l, K_r, acc_s, k0, end, lim, full_to):
        # raw scores (the softmax scale is folded into its exp2); tiles every real row sees whole
        # (k0 + 64 <= min(end, L + 1)) skip the mask; otherwise key k0 + j is visible to row i iff
        # k0 + j < lim[i] = min(split end, L + 1 + the row's token index)
        if k0 + BN > full_to:
            for i, j in T.Parallel(BM, BN):
                acc_s[i, j] = T.if_then_else(k0 + j < lim[i], acc_s[i, j], NEG)
        if k0 + BN > end:
            # the tile runs past the sequence (or split) end: zero those latent rows before they
            # serve as V, so stale or NaN slots cannot reach the output via 0 * NaN
            for i, j in T.Parallel(BN, H2):
                if k0 + i >= end:
                    K_l[i, j] = T.cast(0, dtype)
                    K_r[i, j] = T.cast(0, dtype)
            T.fence_proxy_async()

    # the staging tile gets a swizzled layout, which TileLang stores with one TMA box per
    # 32-element row piece (hundreds of boxes from one thread); 16-byte vector stores by all 128
    # threads of the warpgroup instead
    NO_TMA = {"disable_tma": True}

    @T.macro
    def store(OUT, LSE, o, stage, inv, l, m, b, pid_m, pid_p, col, with_lse, qk_scale):
        # this warpgroup's 64 x r/2 half of o * (1 / l); rows past ROWS are not written. direct:
        # OUT (B, ROWS, r) in the input dtype, staged in shared memory over the latent ring
        # (``stage``, free after the KV loop) and written as 16-byte vectors; split: OUT (B, ROWS,
        # NSPLIT, r) fp32 stored straight from the accumulator layout, + LSE (B, ROWS, NSPLIT).
        # Session 6 divided by l per element while storing from the accumulator: ~7 us per
        # program (benchmarks/decode_kernels_h200/experiments/timeline); the reciprocal took most
        # of that away, and for fp32 partials the direct stores then beat staging them in two
        # halves by 1.01-1.09x (experiments/epilogue_split_ab)
        m0 = pid_m * BM
        if direct:
            for i, j in T.Parallel(BM, H2):
                stage[i, j] = T.cast(o[i, j] * inv[i], dtype)
            T.copy(stage, OUT[b, m0:m0 + BM, col:col + H2], annotations=NO_TMA)
        else:
            for i, j in T.Parallel(BM, H2):
                if m0 + i < rows:
                    OUT[b, m0 + i, pid_p, col + j] = o[i, j] * inv[i]
            if with_lse:
                for i in T.Parallel(BM):
                    if m0 + i < rows:
                        LSE[b, m0 + i, pid_p] = T.if_then_else(
                            l[i] > 0, m[i] * qk_scale + T.log2(l[i]), NEG)

    @T.macro
    def kernel_body(Q, QR, C, KR, LENS, BT, qk_scale, heads, cap, nsplit, pid_p, pid_m, b, OUT, LSE):
        Q_l = T.alloc_shared([BM, H2], dtype)
        Q_r = T.alloc_shared([BM, H2], dtype)
        Q_pe = T.alloc_shared([BM, dr], dtype)
        K0_l = T.alloc_shared([BN, H2], dtype)
        K0_r = T.alloc_shared([BN, H2], dtype)
        K0_pe = T.alloc_shared([BN, dr], dtype)
        K1_l = T.alloc_shared([BN, H2], dtype)
        K1_r = T.alloc_shared([BN, H2], dtype)
        K1_pe = T.alloc_shared([BN, dr], dtype)
        P_s = T.alloc_shared([BM, BN], dtype)
        alpha_s = T.alloc_shared([BM], acc)
        inv_s = T.alloc_shared([BM], acc)     # 1 / l per row, for "right"'s half of the output
        # direct output staging after the KV loop (``store``), over the latent ring: each warpgroup
        # writes over the half only it and the score products read
        st_l, st_r = K0_l, K0_r

        acc_s = T.alloc_fragment([BM, BN], acc)
        lim = T.alloc_fragment([BM], "int32")
        m_sc = T.alloc_fragment([BM], acc)
        acc_l = T.alloc_fragment([BM, H2], acc)
        acc_r = T.alloc_fragment([BM, H2], acc)
        m_i = T.alloc_fragment([BM], acc)
        m_prev = T.alloc_fragment([BM], acc)
        alpha = T.alloc_fragment([BM], acc)
        l_i = T.alloc_fragment([BM], acc)
        rsum = T.alloc_fragment([BM], acc)
        inv_l = T.alloc_fragment([BM], acc)

        # tma_copy registers the expected bytes (one elected thread); a phase completes when the
        # bytes have landed and all 128 producer threads have arrived
        bar_q = T.alloc_barrier(128)
        full = T.alloc_barrier([128, 128])
        empty = T.alloc_barrier([256, 256])
        p_ready = T.alloc_barrier(128)
        p_free = T.alloc_barrier(128)
        done = T.alloc_barrier(128)

        L = T.cast(LENS[b], "int32")
        n_keys = T.min(L + rows // heads, cap)
        chunk = T.ceildiv(T.ceildiv(n_keys, nsplit), BN) * BN
        start = pid_p * chunk
        end = T.min(start + chunk, n_keys)
        n_iter = T.ceildiv(T.max(end - start, 0), BN)
        tx = T.get_thread_binding()

        # register budgets (setmaxnreg): the kernel launches at 168 per thread (64K / 384); the
        # producer gives back to 80 and "scores" takes 240, "right" keeps 168: 128 x (80 + 240 +
        # 168) <= 64K. Asking for more than the producer frees makes setmaxnreg.inc wait forever.
        if tx >= 256:
            T.set_max_nreg(80, 0)
            # one TMA box each; rows past ROWS lie outside the (B, ROWS, .) tensor: zeros
            T.tma_copy(Q[b, pid_m * BM:pid_m * BM + BM, 0:H2], Q_l, barrier=bar_q[0])
            T.tma_copy(Q[b, pid_m * BM:pid_m * BM + BM, H2:r], Q_r, barrier=bar_q[0])
            T.tma_copy(QR[b, pid_m * BM:pid_m * BM + BM, :], Q_pe, barrier=bar_q[0])
            T.barrier_arrive(bar_q[0])
            for i in T.serial(T.ceildiv(n_iter, 2)):
                k0 = start + 2 * i * BN
                T.barrier_wait(empty[0], (i & 1) ^ 1)
                load_tile(C, KR, BT, b, k0, K0_l, K0_r, K0_pe, full, 0)
                if 2 * i + 1 < n_iter:
                    T.barrier_wait(empty[1], (i & 1) ^ 1)
                    load_tile(C, KR, BT, b, k0 + BN, K1_l, K1_r, K1_pe, full, 1)
        elif tx < 128:
            T.set_max_nreg(240, 1)
            T.fill(acc_l, 0)
            T.fill(l_i, 0)
            T.fill(m_i, NEG)
            full_to = T.min(end, L + 1)     # keys every real row of this split sees
            for i in T.Parallel(BM):
                lim[i] = T.min(end, L + 1 + (pid_m * BM + i) // heads)
            T.barrier_wait(bar_q[0], 0)
            for t in T.serial(n_iter):
                k0 = start + t * BN
                T.barrier_wait(full[t % 2], (t // 2) & 1)
                if t % 2 == 0:
                    qk_issue(Q_l, Q_r, Q_pe, K0_l, K0_r, K0_pe, acc_s)
                    T.wait_wgmma(0)
                    qk_fix(K0_l, K0_r, acc_s, k0, end, lim, full_to)
                else:
                    qk_issue(Q_l, Q_r, Q_pe, K1_l, K1_r, K1_pe, acc_s)
                    T.wait_wgmma(0)
                    qk_fix(K1_l, K1_r, acc_s, k0, end, lim, full_to)
                # online softmax on raw scores s: m = running max of s, p = 2^(scale * s - scale * m)
                T.copy(m_i, m_prev)
                T.reduce_max(acc_s, m_i, dim=1, clear=False)
                # a row with no visible key so far keeps m = -inf: it subtracts 0 instead, so its
                # (all -inf) scores give p = 0 with no select per element (a select there was a
                # branch per element pair: 1.04-1.24x without it, experiment run 2)
                for i in T.Parallel(BM):
                    alpha[i] = T.if_then_else(m_i[i] == NEG, 1.0, T.exp2((m_prev[i] - m_i[i]) * qk_scale))
                    m_sc[i] = T.if_then_else(m_i[i] == NEG, 0.0, m_i[i] * qk_scale)
                for i, j in T.Parallel(BM, BN):
                    acc_s[i, j] = T.exp2(acc_s[i, j] * qk_scale - m_sc[i])
                T.reduce_sum(acc_s, rsum, dim=1)
                for i in T.Parallel(BM):
                    l_i[i] = l_i[i] * alpha[i] + rsum[i]
                if t > 0:   # "right" has finished with the previous P
                    T.barrier_wait(p_free[0], (t - 1) & 1)
                T.copy(acc_s, P_s)
                T.copy(alpha, alpha_s)
                T.fence_proxy_async()
                T.barrier_arrive(p_ready[0])
                for i, j in T.Parallel(BM, H2):
                    acc_l[i, j] *= alpha[i]
                if t % 2 == 0:
                    T.gemm(P_s, K0_l, acc_l)
                    T.barrier_arrive(empty[0])
                else:
                    T.gemm(P_s, K1_l, acc_l)
                    T.barrier_arrive(empty[1])
            for i in T.Parallel(BM):
                inv_l[i] = T.if_then_else(l_i[i] > 0, 1.0 / l_i[i], 1.0)
            T.copy(inv_l, inv_s)
            T.barrier_arrive(done[0])
            # direct: staging over K0_l: every tile has landed and been read (no other reader);
            # "right" stages over K0_r, which the score products read, after ``done``
            store(OUT, LSE, acc_l, st_l, inv_l, l_i, m_i, b, pid_m, pid_p, 0, True, qk_scale)
        else:
            T.set_max_nreg(168, 1)
            T.fill(acc_r, 0)
            for t in T.serial(n_iter):
                T.barrier_wait(p_ready[0], t & 1)
                for i, j in T.Parallel(BM, H2):
                    acc_r[i, j] *= alpha_s[i]
                if t % 2 == 0:
                    T.gemm(P_s, K0_r, acc_r)
                    T.barrier_arrive(p_free[0])
                    T.barrier_arrive(empty[0])
                else:
                    T.gemm(P_s, K1_r, acc_r)
                    T.barrier_arrive(p_free[0])
                    T.barrier_arrive(empty[1])
            T.barrier_wait(done[0], 0)
            store(OUT, LSE, acc_r, st_r, inv_s, inv_s, m_i, b, pid_m, pid_p, H2, False, qk_scale)

    if direct:
        @T.prim_func
        def main(Q: T.Tensor((B, rows, r), dtype), QR: T.Tensor((B, rows, dr), dtype),
                 C: T.Tensor((cache_lead, cache_rows, r), dtype),
                 KR: T.Tensor((cache_lead, cache_rows, dr), dtype),
                 LENS: T.Tensor((B,), len_dtype), BT: T.Tensor((B, MAXP), "int32"),
                 OUT: T.Tensor((B, rows, r), dtype), qk_scale: T.float32, heads: T.int32, cap: T.int32):
            with T.Kernel(1, T.ceildiv(rows, BM), B, threads=THREADS) as (pid_p, pid_m, b):
                kernel_body(Q, QR, C, KR, LENS, BT, qk_scale, heads, cap, 1, pid_p, pid_m, b, OUT, OUT)
    else:
        @T.prim_func
        def main(Q: T.Tensor((B, rows, r), dtype), QR: T.Tensor((B, rows, dr), dtype),
                 C: T.Tensor((cache_lead, cache_rows, r), dtype),
                 KR: T.Tensor((cache_lead, cache_rows, dr), dtype),
                 LENS: T.Tensor((B,), len_dtype), BT: T.Tensor((B, MAXP), "int32"),
                 OPART: T.Tensor((B, rows, NSPLIT, r), acc), LSE: T.Tensor((B, rows, NSPLIT), acc),
                 qk_scale: T.float32, heads: T.int32, cap: T.int32):
            with T.Kernel(NSPLIT, T.ceildiv(rows, BM), B, threads=THREADS) as (pid_p, pid_m, b):
                kernel_body(Q, QR, C, KR, LENS, BT, qk_scale, heads, cap, NSPLIT, pid_p, pid_m, b, OPART, LSE)
    return main


def kernel_args(r: int, dr: int, dtype: torch.dtype, len_dtype: torch.dtype, page: int) -> dict:
    """``compile_absorb`` arguments (all but ``direct``) for calls with these widths, cache dtype,
    lengths dtype and page size (0 = contiguous): the one mapping ``absorb_decode`` and the
    backend's load-time warm-up share, so the warm-up compiles exactly the kernels calls use."""
    return dict(r=r, dr=dr, dtype=_tl_dtype(dtype), len_dtype=_tl_dtype(len_dtype), page=page)


@functools.lru_cache(maxsize=64)
def compile_absorb(*, r: int, dr: int, dtype: str, len_dtype: str, page: int, direct: bool,
                   target: Optional[str] = None):
    """Compiled kernel (TileLang JIT; its disk cache makes repeats cheap). ``target`` None =
    the current GPU; an arch such as "sm_90a" compiles offline (tests on machines without a GPU)."""
    import tilelang

    prog = build_absorb_program(r=r, dr=dr, dtype=dtype, len_dtype=len_dtype, page=page, direct=direct)
    kw = {} if target is None else {"target": {"kind": "cuda", "arch": target}}
    return tilelang.compile(prog, **kw)


def absorb_decode(q_abs: Tensor, q_rope: Tensor, c: Tensor, k_rope: Tensor, lengths: Tensor,
                  softmax_scale: float, *, block_table: Optional[Tensor] = None,
                  out: Optional[Tensor] = None, num_splits: Optional[int] = None,
                  max_len: Optional[int] = None, validate: bool = True) -> Tensor:
    """Drop-in for ``triton_decode.absorb_decode`` (same arguments and result) on sm_90.
    ``num_splits`` None = the split heuristic."""
    from . import triton_decode as td

    B, S, H, R, DR = td.check_absorb_inputs(q_abs, q_rope, c, k_rope, lengths)
    problems = absorb_problems(q_abs.device, q_abs.dtype, kv_lora_rank=R, rope_dim=DR)
    if problems:
        raise ValueError("tilelang absorb kernel: " + "; ".join(problems))
    for n, t in (("c", c), ("k_rope", k_rope)):
        if not _tma_ok(t):
            raise ValueError(f"{n} needs a contiguous last dim, 16-byte aligned strides and a "
                             f"16-byte aligned start (TMA), got strides {tuple(t.stride())}, "
                             f"address % 16 = {t.data_ptr() % 16}")
    cap, page = td._cache_geometry(B, [("c", c), ("k_rope", k_rope)], block_table, lengths, q_abs.device)
    problem = _paging_problem(page, block_table)
    if problem:
        raise ValueError(problem)
    if validate:
        td._validate_lengths(lengths, S, cap, block_table, page, c.shape[0])
    out = td._out_buffer(out, (B, S, H, R), q_abs.dtype, q_abs.device)
    if B == 0 or cap == 0:
        return out.zero_()
    rows = S * H
    q2 = q_abs.reshape(B, rows, R)
    qr2 = q_rope.reshape(B, rows, DR)
    if not _tma_ok(q2):   # queries are small: copy rather than refuse
        q2 = q2.contiguous()
    if not _tma_ok(qr2):
        qr2 = qr2.contiguous()
    nsplit = num_splits or plan_splits(B, rows, max_len or cap, q_abs.device)
    bt = block_table if block_table is not None else _dummy_table(q_abs.device, B)
    common = kernel_args(R, DR, q_abs.dtype, lengths.dtype, page)
    qk_scale = float(softmax_scale) * math.log2(math.e)
    if nsplit == 1:
        o2 = out.view(B, rows, R) if out.is_contiguous() else torch.empty(B, rows, R, dtype=out.dtype,
                                                                            device=out.device)
        compile_absorb(direct=True, **common)(q2, qr2, c, k_rope, lengths, bt, o2, qk_scale, H, cap)
        if o2.data_ptr() != out.data_ptr():
            out.copy_(o2.view(B, S, H, R))
        return out
    opart = torch.empty(B, rows, nsplit, R, dtype=torch.float32, device=q_abs.device)
    lse = torch.empty(B, rows, nsplit, dtype=torch.float32, device=q_abs.device)
    compile_absorb(direct=False, **common)(q2, qr2, c, k_rope, lengths, bt, opart, lse, qk_scale, H, cap)
    td._run_combine(opart, lse, out, H, R, nsplit, q_abs.device)
    return out


_DUMMY = {}


def _dummy_table(device, B: int) -> Tensor:
    """A (B, 1) int32 stand-in for the block table of contiguous caches (never read)."""
    key = (str(device), B)
    t = _DUMMY.get(key)
    if t is None:
        t = _DUMMY[key] = torch.zeros(B, 1, dtype=torch.int32, device=device)
    return t
