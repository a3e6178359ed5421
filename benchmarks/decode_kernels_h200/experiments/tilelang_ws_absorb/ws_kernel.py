"""EXPERIMENT (compiled offline for sm_90a only; NOT run on a GPU yet, NOT used by the package).

A hand-scheduled variant of the TileLang absorb kernel (gqla_megatron/kernels/tilelang_decode.py),
to test whether overlapping the softmax with the P.V product lifts the absorb path above the
~77 % of copy the automatic warp specialisation reaches (run 10). Same contract and partial-output
layout as ``tilelang_decode.build_absorb_program`` (contiguous caches only here).

Roles (384 threads, explicit mbarriers):
  producer  (threads 256-383): TMA loads of the query tiles once, then of each 64-token latent
            tile as a left half (64 x 256), a right half (64 x 256) and the RoPE key (64 x 64)
            into a 2-buffer ring; waits for a buffer to be released before refilling it.
  scores    (threads 0-127):   the whole 64 x 64 score tile (three wgmma: left, right, RoPE),
            masking, the online softmax, P and the rescale factor to shared memory, then its own
            half of the output, P.c[:, :256].
  right     (threads 128-255): waits for P, rescales and adds P.c[:, 256:] to its half.
While "right" runs its P.V on tile t, "scores" already runs the score wgmma and softmax of tile
t + 1 (it waits for "right" to free P only before overwriting it): FlashMLA's split of roles.

Hazards handled: stale latent rows past the split end are zeroed in both halves by "scores"
after its score wgmma completes and before it signals P (fence for the async proxy); buffers are
released (empty barrier, 256 arrivals) only after both P.V products that read them.

Build offline:  python3 ws_kernel.py   (needs tilelang and nvcc; prints registers / spills)
"""

import tilelang.language as T

BM, BN = 64, 64


def build(*, r=512, dr=64, dtype="bfloat16", len_dtype="int32", evict=None, async_qk=False,
          defer_pv=False):
    """evict: TMA cache hint for the latent tiles; async_qk: issue the three score products
    back to back and wait once (T.gemm waits after each); defer_pv (needs async_qk): the
    scores warpgroup does not wait for its P.V of tile t -- the wait for the scores of tile
    t + 1 covers it, so the wgmma overlaps the wait for the next tile; its buffer is released
    after that wait."""
    assert async_qk or not defer_pv
    H2 = r // 2
    qk = T.wgmma_gemm if async_qk else T.gemm
    pv = T.wgmma_gemm if defer_pv else T.gemm
    acc = "float32"
    B = T.dynamic("B")
    rows = T.dynamic("ROWS")
    NSPLIT = T.dynamic("NSPLIT")
    TC = T.dynamic("TC")

    @T.prim_func
    def main(Q: T.Tensor((B, rows, r), dtype), QR: T.Tensor((B, rows, dr), dtype),
             C: T.Tensor((B, TC, r), dtype), KR: T.Tensor((B, TC, dr), dtype),
             LENS: T.Tensor((B,), len_dtype),
             OPART: T.Tensor((B, rows, NSPLIT, r), acc), LSE: T.Tensor((B, rows, NSPLIT), acc),
             qk_scale: T.float32, heads: T.int32, cap: T.int32):
        with T.Kernel(NSPLIT, T.ceildiv(rows, BM), B, threads=384) as (pid_p, pid_m, b):
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
            l_s = T.alloc_shared([BM], acc)

            acc_s = T.alloc_fragment([BM, BN], acc)
            acc_l = T.alloc_fragment([BM, H2], acc)
            acc_r = T.alloc_fragment([BM, H2], acc)
            m_i = T.alloc_fragment([BM], acc)
            m_prev = T.alloc_fragment([BM], acc)
            alpha = T.alloc_fragment([BM], acc)
            l_i = T.alloc_fragment([BM], acc)
            rsum = T.alloc_fragment([BM], acc)

            # tma_copy registers the expected bytes (one elected thread); the phase completes when
            # the bytes have landed and all 128 producer threads have arrived
            bar_q = T.alloc_barrier(128)
            full = T.alloc_barrier([128, 128])
            empty = T.alloc_barrier([256, 256])
            p_ready = T.alloc_barrier(128)
            p_free = T.alloc_barrier(128)
            done = T.alloc_barrier(128)

            L = T.cast(LENS[b], "int32")
            n_keys = T.min(L + rows // heads, cap)
            chunk = T.ceildiv(T.ceildiv(n_keys, NSPLIT), BN) * BN
            start = pid_p * chunk
            end = T.min(start + chunk, n_keys)
            n_iter = T.ceildiv(T.max(end - start, 0), BN)
            n_pair = T.ceildiv(n_iter, 2)
            tx = T.get_thread_binding()

            if tx >= 256:
                T.set_max_nreg(80, 0)
                T.tma_copy(Q[b, pid_m * BM:pid_m * BM + BM, 0:H2], Q_l, barrier=bar_q[0])
                T.tma_copy(Q[b, pid_m * BM:pid_m * BM + BM, H2:r], Q_r, barrier=bar_q[0])
                T.tma_copy(QR[b, pid_m * BM:pid_m * BM + BM, :], Q_pe, barrier=bar_q[0])
                T.barrier_arrive(bar_q[0])
                for i in T.serial(n_pair):
                    k0 = start + 2 * i * BN
                    T.barrier_wait(empty[0], (i & 1) ^ 1)
                    T.tma_copy(C[b, k0:k0 + BN, 0:H2], K0_l, barrier=full[0], eviction_policy=evict)
                    T.tma_copy(C[b, k0:k0 + BN, H2:r], K0_r, barrier=full[0], eviction_policy=evict)
                    T.tma_copy(KR[b, k0:k0 + BN, :], K0_pe, barrier=full[0], eviction_policy=evict)
                    T.barrier_arrive(full[0])
                    if 2 * i + 1 < n_iter:
                        T.barrier_wait(empty[1], (i & 1) ^ 1)
                        T.tma_copy(C[b, k0 + BN:k0 + 2 * BN, 0:H2], K1_l, barrier=full[1], eviction_policy=evict)
                        T.tma_copy(C[b, k0 + BN:k0 + 2 * BN, H2:r], K1_r, barrier=full[1], eviction_policy=evict)
                        T.tma_copy(KR[b, k0 + BN:k0 + 2 * BN, :], K1_pe, barrier=full[1], eviction_policy=evict)
                        T.barrier_arrive(full[1])
            elif tx < 128:
                T.set_max_nreg(240, 1)
                T.fill(acc_l, 0)
                T.fill(l_i, 0)
                T.fill(m_i, -T.infinity(acc))
                T.barrier_wait(bar_q[0], 0)
                for t in T.serial(n_iter):
                    k0 = start + t * BN
                    T.barrier_wait(full[t % 2], (t // 2) & 1)
                    T.clear(acc_s)
                    if t % 2 == 0:
                        qk(Q_l, K0_l, acc_s, transpose_B=True)
                        qk(Q_r, K0_r, acc_s, transpose_B=True)
                        qk(Q_pe, K0_pe, acc_s, transpose_B=True)
                        if async_qk:
                            T.wait_wgmma(0)
                        if defer_pv:   # the wait above also finished P.V of tile t - 1
                            if t > 0:
                                T.barrier_arrive(empty[1])
                    else:
                        qk(Q_l, K1_l, acc_s, transpose_B=True)
                        qk(Q_r, K1_r, acc_s, transpose_B=True)
                        qk(Q_pe, K1_pe, acc_s, transpose_B=True)
                        if async_qk:
                            T.wait_wgmma(0)
                        if defer_pv:
                            T.barrier_arrive(empty[0])
                    for i, j in T.Parallel(BM, BN):
                        acc_s[i, j] = T.if_then_else(
                            (k0 + j < end) & (k0 + j <= L + (pid_m * BM + i) // heads) & (pid_m * BM + i < rows),
                            acc_s[i, j] * qk_scale, -T.infinity(acc))
                    if k0 + BN > end:   # stale rows past the end: zero them before they serve as V
                        if t % 2 == 0:
                            for i, j in T.Parallel(BN, H2):
                                if k0 + i >= end:
                                    K0_l[i, j] = T.cast(0, dtype)
                                    K0_r[i, j] = T.cast(0, dtype)
                        else:
                            for i, j in T.Parallel(BN, H2):
                                if k0 + i >= end:
                                    K1_l[i, j] = T.cast(0, dtype)
                                    K1_r[i, j] = T.cast(0, dtype)
                        T.fence_proxy_async()
                    T.copy(m_i, m_prev)
                    T.reduce_max(acc_s, m_i, dim=1, clear=False)
                    for i in T.Parallel(BM):
                        alpha[i] = T.if_then_else(m_i[i] == -T.infinity(acc), 1.0, T.exp2(m_prev[i] - m_i[i]))
                    for i, j in T.Parallel(BM, BN):
                        acc_s[i, j] = T.if_then_else(m_i[i] == -T.infinity(acc), 0.0, T.exp2(acc_s[i, j] - m_i[i]))
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
                        pv(P_s, K0_l, acc_l)
                        if not defer_pv:
                            T.barrier_arrive(empty[0])
                    else:
                        pv(P_s, K1_l, acc_l)
                        if not defer_pv:
                            T.barrier_arrive(empty[1])
                if defer_pv:
                    T.wait_wgmma(0)
                T.copy(l_i, l_s)
                T.barrier_arrive(done[0])
                for i, j in T.Parallel(BM, H2):
                    if pid_m * BM + i < rows:
                        OPART[b, pid_m * BM + i, pid_p, j] = acc_l[i, j] / T.if_then_else(l_i[i] > 0, l_i[i], 1.0)
                for i in T.Parallel(BM):
                    if pid_m * BM + i < rows:
                        LSE[b, pid_m * BM + i, pid_p] = T.if_then_else(
                            l_i[i] > 0, m_i[i] + T.log2(l_i[i]), -T.infinity(acc))
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
                for i, j in T.Parallel(BM, H2):
                    if pid_m * BM + i < rows:
                        OPART[b, pid_m * BM + i, pid_p, H2 + j] = acc_r[i, j] / T.if_then_else(
                            l_s[i] > 0, l_s[i], 1.0)
    return main


if __name__ == "__main__":
    import os
    import re
    import subprocess
    import tempfile

    import tilelang

    kern = tilelang.compile(build(), target={"kind": "cuda", "arch": "sm_90a"})
    src = kern.get_kernel_source()
    out = os.environ.get("WS_SRC", os.path.join(tempfile.gettempdir(), "ws_absorb.cu"))
    with open(out, "w") as f:
        f.write(src)
    inc = os.path.join(os.path.dirname(tilelang.__file__), "src")
    cut = os.path.join(os.path.dirname(tilelang.__file__), "3rdparty", "cutlass", "include")
    r = subprocess.run(["nvcc", "--cubin", "-O3", "-arch=sm_90a", "-std=c++20", f"-I{inc}", f"-I{cut}",
                        "-Xptxas", "-v", "-o", out + ".cubin", out], capture_output=True, text=True)
    print("\n".join(l for l in (r.stderr + r.stdout).splitlines() if re.search("registers|spill|error", l)))
    print("source:", out, "| tma_load:", src.count("tma_load("), "| wgmma:", src.count("wgmma_ss"),
          "| setmaxnreg:", src.count("warpgroup_reg_"))
