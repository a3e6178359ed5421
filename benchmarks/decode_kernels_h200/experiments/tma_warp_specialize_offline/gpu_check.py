"""GPU check of the TMA-descriptor absorb kernel (absorb_ws.py, no warp specialisation) against
the product kernel (gqla_megatron.kernels.triton_decode.absorb_decode) on 64-row cells (s_q 2):
same split count, same inputs, CUDA-graph timing with the L2 flushed (gqla-bench's timer).

    python3 benchmarks/decode_kernels_h200/experiments/tma_warp_specialize_offline/gpu_check.py
"""
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import absorb_ws  # noqa: E402

from gqla_megatron import bench_decode as bd  # noqa: E402
from gqla_megatron.kernels import triton_decode as td  # noqa: E402

dev = torch.device("cuda")
triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
kern = triton.jit(absorb_ws.absorb_ws_kernel, do_not_specialize=["cap", "nsplit", "H", "S"])
shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=dev)
rates = bd.measure_rates(dev, copy_mib=2048, gemm_n=4096)
print(f"copy {rates['copy_tbps']:.2f} TB/s")
for B, L, S, bm, nw, ns in ((32, 8192, 2, 64, 8, 2), (128, 8192, 2, 64, 8, 2), (32, 32768, 2, 64, 8, 2)):
    x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0)
    H, R = shp.heads, shp.kv_lora_rank
    ref_fn, _, note = bd._method_triton("absorb", shp, x)
    nsplit = note["num_splits"]
    out = torch.empty_like(x["q"])
    opart = torch.empty(B, S * H, nsplit, R, dtype=torch.float32, device=dev)
    lse = torch.empty(B, S * H, nsplit, dtype=torch.float32, device=dev)
    q, qr, c, kr, lens = x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"]
    qk = x["scale"] * math.log2(math.e)

    def tma():
        direct = nsplit == 1
        kern[(nsplit, triton.cdiv(H * S, bm), B)](
            q, qr, c, kr, lens, opart, lse, out,
            q.stride(0), q.stride(1), q.stride(2), qr.stride(0), qr.stride(1), qr.stride(2),
            c.stride(0), c.stride(1), kr.stride(0), kr.stride(1),
            opart.stride(0), opart.stride(1), opart.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), out.stride(2), qk, L, nsplit, H, S,
            R=R, DR=shp.rope_dim, BLOCK_M=bm, BLOCK_N=64, DIRECT=direct, WS=False, STAGES=ns,
            num_warps=nw, num_stages=ns)
        if not direct:
            td._run_combine(opart, lse, out, H, R, nsplit, dev)
        return out

    want = ref_fn().clone()
    got = tma().clone()
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    t_ref = bd.time_graph(ref_fn, dev, warmup=3, iters=10, flush=flush)
    t_tma = bd.time_graph(tma, dev, warmup=3, iters=10, flush=flush)
    nbytes = bd.cache_bytes("absorb", shp, B, L, 2) + bd.qo_bytes("absorb", shp, B, S, 2)
    print(f"B={B} L={L} s_q={S} splits={nsplit}: product {t_ref * 1e6:.1f} us "
          f"({100 * nbytes / t_ref / 1e12 / rates['copy_tbps']:.0f} %), TMA {t_tma * 1e6:.1f} us "
          f"({100 * nbytes / t_tma / 1e12 / rates['copy_tbps']:.0f} %), rel err {err:.1e}")
    del x
