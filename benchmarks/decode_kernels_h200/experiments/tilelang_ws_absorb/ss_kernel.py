"""EXPERIMENT (session 5): a "seesaw" schedule for the TileLang absorb kernel.

Same contract and split-output layout as ``ws_kernel.build`` (contiguous caches only). The ws
kernel gives one consumer warpgroup the whole score tile, the softmax and half of P.V, and the
other only the other half of P.V, so the first one's chain (QK 64x64x576 + softmax + half P.V)
sets the pace while the second idles. Here the 64-token latent tiles are taken in pairs
(buffer 0 = tile 2i, buffer 1 = tile 2i+1) and the two warpgroups mirror each other:

  WG0 (threads 0-127, left output half O_L)       WG1 (threads 128-255, right output half O_R)
  S0 = Q.K0^T, mask, m0 = max(m, rowmax S0)       S1 = Q.K1^T, mask
  sc0 = 2^(m - m0), P0 = 2^(S0 - m0)  -> smem      wait sc0/m0; m1 = max(m0, rowmax S1)
  O_L = O_L*sc0 + P0 . V0_L  (P0 from registers)   sc1 = 2^(m0 - m1), P1 = 2^(S1 - m1) -> smem
  wait sc1/m1; P0*sc1 -> shared for WG1           O_R = O_R*sc0*sc1 + P1 . V1_R (registers)
  O_L = O_L*sc1 + P1 . V1_L  (P1 from shared)      O_R += (P0*sc1) . V0_R        (from shared)

so each warpgroup does one score product and two half P.V products per pair, and one's softmax
runs while the other's wgmma does. The row sums are kept per warpgroup (both relative to the
running max after each pair) and added at the end. A producer warpgroup (threads 256-383) loads
the query once and each tile (left half, right half, RoPE key) by TMA into the two buffers,
refilling a buffer when both warpgroups have released it.

Shared memory: Q (72 KB) + two tiles (144 KB) + P0 (8 KB) is the ~224 KB the ws kernel uses; the
second P tile (P1, 8 KB) would not fit, so the query's RoPE part is copied to registers in both
consumers (its score product takes A from registers) and its shared buffer is reused for P1.

Hazards: every shared buffer written by one warpgroup and read by the other is ordered by an
mbarrier (sc0 / sc1 / P0 / P1 ready, one phase per pair); a write of pair i + 1 happens after the
writer has waited for a signal the reader gives after its last read of pair i (see the notes in
the body). Stale latent rows past the split end are zeroed by the warpgroup that scores that tile,
after its score product and before either P.V product reads it.

Build offline:  python3 ss_kernel.py   (needs tilelang and nvcc; prints registers / spills)
"""

import tilelang.language as T

BM, BN = 64, 64


def build(*, r=512, dr=64, dtype="bfloat16", len_dtype="int32", evict=None, async_qk=False):
    assert dr == BN, "the RoPE query buffer is reused as the second P tile: needs d_r == 64"
    H2 = r // 2
    qk = T.wgmma_gemm if async_qk else T.gemm
    acc = "float32"
    B = T.dynamic("B")
    rows = T.dynamic("ROWS")
    NSPLIT = T.dynamic("NSPLIT")
    TC = T.dynamic("TC")
    NEG = -T.infinity(acc)

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
            P0_s = T.alloc_shared([BM, BN], dtype)
            P1_s = Q_pe            # free once both consumers hold the RoPE query in registers
            sc0_s = T.alloc_shared([BM], acc)
            sc1_s = T.alloc_shared([BM], acc)
            m_s = T.alloc_shared([BM], acc)
            l0_s = T.alloc_shared([BM], acc)
            l1_s = T.alloc_shared([BM], acc)

            # WG0
            qpe0 = T.alloc_fragment([BM, dr], dtype)
            s0 = T.alloc_fragment([BM, BN], acc)
            p0 = T.alloc_fragment([BM, BN], dtype)
            o_l = T.alloc_fragment([BM, H2], acc)
            m0 = T.alloc_fragment([BM], acc)
            mp0 = T.alloc_fragment([BM], acc)
            sc0 = T.alloc_fragment([BM], acc)
            sc1w0 = T.alloc_fragment([BM], acc)
            rs0 = T.alloc_fragment([BM], acc)
            l0 = T.alloc_fragment([BM], acc)
            # WG1
            qpe1 = T.alloc_fragment([BM, dr], dtype)
            s1 = T.alloc_fragment([BM, BN], acc)
            p1 = T.alloc_fragment([BM, BN], dtype)
            o_r = T.alloc_fragment([BM, H2], acc)
            m1 = T.alloc_fragment([BM], acc)
            mp1 = T.alloc_fragment([BM], acc)
            sc1 = T.alloc_fragment([BM], acc)
            sc0w1 = T.alloc_fragment([BM], acc)
            rs1 = T.alloc_fragment([BM], acc)
            l1 = T.alloc_fragment([BM], acc)

            bar_q = T.alloc_barrier(128)
            full = T.alloc_barrier([128, 128])
            empty = T.alloc_barrier([256, 256])
            bar_sc0 = T.alloc_barrier(128)
            bar_sc1 = T.alloc_barrier(128)
            bar_p0 = T.alloc_barrier(128)
            bar_p1 = T.alloc_barrier(128)
            done = T.alloc_barrier(256)

            L = T.cast(LENS[b], "int32")
            n_keys = T.min(L + rows // heads, cap)
            chunk = T.ceildiv(T.ceildiv(n_keys, NSPLIT), BN) * BN
            start = pid_p * chunk
            end = T.min(start + chunk, n_keys)
            n_iter = T.ceildiv(T.max(end - start, 0), BN)
            n_pair = T.ceildiv(n_iter, 2)
            tx = T.get_thread_binding()

            if tx >= 256:
                T.set_max_nreg(24, 0)
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
                T.fill(o_l, 0)
                T.fill(l0, 0)
                T.fill(m0, NEG)
                T.barrier_wait(bar_q[0], 0)
                T.copy(Q_pe, qpe0)
                for i in T.serial(n_pair):
                    k0 = start + 2 * i * BN
                    T.barrier_wait(full[0], i & 1)
                    T.clear(s0)
                    qk(Q_l, K0_l, s0, transpose_B=True)
                    qk(Q_r, K0_r, s0, transpose_B=True)
                    qk(qpe0, K0_pe, s0, transpose_B=True)
                    if async_qk:
                        T.wait_wgmma(0)
                    for a, j in T.Parallel(BM, BN):
                        s0[a, j] = T.if_then_else(
                            (k0 + j < end) & (k0 + j <= L + (pid_m * BM + a) // heads) & (pid_m * BM + a < rows),
                            s0[a, j] * qk_scale, NEG)
                    if k0 + BN > end:   # stale rows past the end: zero them before they serve as V
                        for a, j in T.Parallel(BN, H2):
                            if k0 + a >= end:
                                K0_l[a, j] = T.cast(0, dtype)
                                K0_r[a, j] = T.cast(0, dtype)
                        T.fence_proxy_async()
                    T.copy(m0, mp0)
                    T.reduce_max(s0, m0, dim=1, clear=False)
                    for a in T.Parallel(BM):
                        sc0[a] = T.if_then_else(m0[a] == NEG, 1.0, T.exp2(mp0[a] - m0[a]))
                    for a, j in T.Parallel(BM, BN):
                        s0[a, j] = T.if_then_else(m0[a] == NEG, 0.0, T.exp2(s0[a, j] - m0[a]))
                    T.reduce_sum(s0, rs0, dim=1)
                    # WG1 read sc0_s / m_s of pair i-1 before signalling sc1 of pair i-1 (waited below)
                    T.copy(sc0, sc0_s)
                    T.copy(m0, m_s)
                    T.barrier_arrive(bar_sc0[0])
                    for a in T.Parallel(BM):
                        l0[a] = l0[a] * sc0[a] + rs0[a]
                    for a, j in T.Parallel(BM, H2):
                        o_l[a, j] *= sc0[a]
                    T.copy(s0, p0)
                    T.gemm(p0, K0_l, o_l)
                    T.barrier_wait(bar_sc1[0], i & 1)
                    T.copy(sc1_s, sc1w0)
                    T.copy(m_s, m0)
                    # P0 rescaled to the max after tile 2i+1, for WG1's right half; WG1 finished
                    # reading P0_s of pair i-1 before it signalled sc1 of pair i
                    for a, j in T.Parallel(BM, BN):
                        s0[a, j] *= sc1w0[a]
                    T.copy(s0, P0_s)
                    T.fence_proxy_async()
                    T.barrier_arrive(bar_p0[0])
                    T.barrier_arrive(empty[0])
                    for a in T.Parallel(BM):
                        l0[a] *= sc1w0[a]
                    for a, j in T.Parallel(BM, H2):
                        o_l[a, j] *= sc1w0[a]
                    T.barrier_wait(bar_p1[0], i & 1)
                    if 2 * i + 1 < n_iter:
                        T.gemm(P1_s, K1_l, o_l)
                    T.barrier_arrive(empty[1])
                T.copy(l0, l0_s)
                T.barrier_arrive(done[0])
                T.barrier_wait(done[0], 0)
                for a in T.Parallel(BM):
                    l0[a] += l1_s[a]
                for a, j in T.Parallel(BM, H2):
                    if pid_m * BM + a < rows:
                        OPART[b, pid_m * BM + a, pid_p, j] = o_l[a, j] / T.if_then_else(l0[a] > 0, l0[a], 1.0)
                for a in T.Parallel(BM):
                    if pid_m * BM + a < rows:
                        LSE[b, pid_m * BM + a, pid_p] = T.if_then_else(l0[a] > 0, m0[a] + T.log2(l0[a]), NEG)
            else:
                T.set_max_nreg(240, 1)
                T.fill(o_r, 0)
                T.fill(l1, 0)
                T.barrier_wait(bar_q[0], 0)
                T.copy(Q_pe, qpe1)
                for i in T.serial(n_pair):
                    k1 = start + (2 * i + 1) * BN
                    if 2 * i + 1 < n_iter:
                        T.barrier_wait(full[1], i & 1)
                        T.clear(s1)
                        qk(Q_l, K1_l, s1, transpose_B=True)
                        qk(Q_r, K1_r, s1, transpose_B=True)
                        qk(qpe1, K1_pe, s1, transpose_B=True)
                        if async_qk:
                            T.wait_wgmma(0)
                        for a, j in T.Parallel(BM, BN):
                            s1[a, j] = T.if_then_else(
                                (k1 + j < end) & (k1 + j <= L + (pid_m * BM + a) // heads) & (pid_m * BM + a < rows),
                                s1[a, j] * qk_scale, NEG)
                        if k1 + BN > end:
                            for a, j in T.Parallel(BN, H2):
                                if k1 + a >= end:
                                    K1_l[a, j] = T.cast(0, dtype)
                                    K1_r[a, j] = T.cast(0, dtype)
                            T.fence_proxy_async()
                    else:
                        T.fill(s1, NEG)
                    T.barrier_wait(bar_sc0[0], i & 1)
                    T.copy(m_s, mp1)
                    T.copy(sc0_s, sc0w1)
                    T.copy(mp1, m1)
                    T.reduce_max(s1, m1, dim=1, clear=False)
                    for a in T.Parallel(BM):
                        sc1[a] = T.if_then_else(m1[a] == NEG, 1.0, T.exp2(mp1[a] - m1[a]))
                    for a, j in T.Parallel(BM, BN):
                        s1[a, j] = T.if_then_else(m1[a] == NEG, 0.0, T.exp2(s1[a, j] - m1[a]))
                    T.reduce_sum(s1, rs1, dim=1)
                    T.copy(sc1, sc1_s)
                    T.copy(m1, m_s)
                    # WG0 finished reading P1_s of pair i-1 before it signalled sc0 of pair i
                    T.copy(s1, P1_s)
                    T.fence_proxy_async()
                    T.barrier_arrive(bar_sc1[0])
                    T.barrier_arrive(bar_p1[0])
                    for a in T.Parallel(BM):
                        sc0w1[a] *= sc1[a]
                    for a in T.Parallel(BM):
                        l1[a] = l1[a] * sc0w1[a] + rs1[a]
                    for a, j in T.Parallel(BM, H2):
                        o_r[a, j] *= sc0w1[a]
                    if 2 * i + 1 < n_iter:
                        T.copy(s1, p1)
                        T.gemm(p1, K1_r, o_r)
                    T.barrier_wait(bar_p0[0], i & 1)
                    T.gemm(P0_s, K0_r, o_r)
                    T.barrier_arrive(empty[0])
                    T.barrier_arrive(empty[1])
                T.copy(l1, l1_s)
                T.barrier_arrive(done[0])
                T.barrier_wait(done[0], 0)
                for a in T.Parallel(BM):
                    l1[a] += l0_s[a]
                for a, j in T.Parallel(BM, H2):
                    if pid_m * BM + a < rows:
                        OPART[b, pid_m * BM + a, pid_p, H2 + j] = o_r[a, j] / T.if_then_else(l1[a] > 0, l1[a], 1.0)
    return main


if __name__ == "__main__":
    import os
    import re
    import subprocess
    import sys
    import tempfile

    import tilelang

    kern = tilelang.compile(build(evict=(sys.argv[1] if len(sys.argv) > 1 else None)),
                            target={"kind": "cuda", "arch": "sm_90a"})
    src = kern.get_kernel_source()
    out = os.environ.get("SS_SRC", os.path.join(tempfile.gettempdir(), "ss_absorb.cu"))
    with open(out, "w") as f:
        f.write(src)
    inc = os.path.join(os.path.dirname(tilelang.__file__), "src")
    cut = os.path.join(os.path.dirname(tilelang.__file__), "3rdparty", "cutlass", "include")
    r = subprocess.run(["nvcc", "--cubin", "-O3", "-arch=sm_90a", "-std=c++20", f"-I{inc}", f"-I{cut}",
                        "-Xptxas", "-v", "-o", out + ".cubin", out], capture_output=True, text=True)
    print("\n".join(l for l in (r.stderr + r.stdout).splitlines() if re.search("registers|spill|error", l)))
    print("source:", out, "| tma_load:", src.count("tma_load("), "| wgmma ss/rs:", src.count("wgmma_ss"),
          src.count("wgmma_rs"), "| setmaxnreg:", src.count("warpgroup_reg_"))
