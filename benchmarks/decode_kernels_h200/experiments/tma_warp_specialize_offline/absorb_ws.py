"""Experiment: absorb decode with TMA descriptor loads (+ optional Triton auto warp specialization)."""
import triton
import triton.language as tl


def absorb_ws_kernel(
        Q, QR, C, KR, LENS, OPART, LSE, OUT,
        sq_b, sq_s, sq_h, sqr_b, sqr_s, sqr_h, sc_0, sc_1, skr_0, skr_1,
        sop_b, sop_m, sop_p, slse_b, slse_m, so_b, so_s, so_h,
        qk_scale, cap, nsplit, H, S,
        R: tl.constexpr, DR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr):
    HALF: tl.constexpr = R // 2
    pid_p = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    L = tl.load(LENS + b).to(tl.int32)
    n_keys = tl.minimum(L + S, cap)
    chunk = tl.cdiv(tl.cdiv(n_keys, nsplit), BLOCK_N) * BLOCK_N
    start = pid_p * chunk
    end = tl.minimum(start + chunk, n_keys)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < H * S
    s_idx = offs_m // H
    h_idx = offs_m % H
    last = L + s_idx
    offs_h = tl.arange(0, HALF)
    offs_dr = tl.arange(0, DR)
    qrow = Q + b * sq_b + (s_idx * sq_s + h_idx * sq_h)[:, None]
    q0 = tl.load(qrow + offs_h[None, :], mask=row_ok[:, None], other=0.0)
    q1 = tl.load(qrow + HALF + offs_h[None, :], mask=row_ok[:, None], other=0.0)
    qr = tl.load(QR + b * sqr_b + (s_idx * sqr_s + h_idx * sqr_h)[:, None] + offs_dr[None, :],
                 mask=row_ok[:, None], other=0.0)
    c_desc = tl.make_tensor_descriptor(C + b * sc_0, shape=[end, R], strides=[sc_1, 1],
                                       block_shape=[BLOCK_N, HALF])
    kr_desc = tl.make_tensor_descriptor(KR + b * skr_0, shape=[end, DR], strides=[skr_1, 1],
                                        block_shape=[BLOCK_N, DR])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES, warp_specialize=WS):
        c0 = c_desc.load([n0, 0])
        c1 = c_desc.load([n0, HALF])
        kr = kr_desc.load([n0, 0])
        sc = tl.dot(q0, tl.trans(c0))
        sc = tl.dot(q1, tl.trans(c1), sc)
        sc = tl.dot(qr, tl.trans(kr), sc) * qk_scale
        offs_n = n0 + tl.arange(0, BLOCK_N)
        sc = tl.where((offs_n[None, :] <= last[:, None]) & (offs_n < end)[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(sc - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p16 = p.to(C.dtype.element_ty)
        acc0 = tl.dot(p16, c0, acc0 * alpha[:, None])
        acc1 = tl.dot(p16, c1, acc1 * alpha[:, None])
        m_i = m_new
    l_ok = l_i > 0.0
    l_div = tl.where(l_ok, l_i, 1.0)
    o0 = acc0 / l_div[:, None]
    o1 = acc1 / l_div[:, None]
    if DIRECT:
        orow = OUT + b * so_b + (s_idx * so_s + h_idx * so_h)[:, None]
        tl.store(orow + offs_h[None, :], o0.to(OUT.dtype.element_ty), mask=row_ok[:, None])
        tl.store(orow + HALF + offs_h[None, :], o1.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    else:
        prow = OPART + b * sop_b + offs_m[:, None] * sop_m + pid_p * sop_p
        tl.store(prow + offs_h[None, :], o0, mask=row_ok[:, None])
        tl.store(prow + HALF + offs_h[None, :], o1, mask=row_ok[:, None])
        tl.store(LSE + b * slse_b + offs_m * slse_m + pid_p,
                 tl.where(l_ok, m_i + tl.log2(l_div), float("-inf")), mask=row_ok)
