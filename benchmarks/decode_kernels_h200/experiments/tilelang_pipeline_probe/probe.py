"""EXPERIMENT (session 5): how fast can the absorb kernel's load pipeline stream, with no math?

The TileLang absorb kernel (gqla_megatron/kernels/tilelang_decode.py) feeds its consumers from a
ring of 2 shared-memory buffers of one 64-token latent tile each (64 x 512 + 64 x 64 bf16 = 72 KB)
beside a 72 KB query tile, refilled by a TMA producer warpgroup once both consumers released a
buffer. Every schedule tried (experiments/tilelang_ws_absorb) stops at 75-83 % of the copy rate in
the large cells. This probe keeps the producer, the barriers and the shared-memory footprint and
drops the math: the two consumer warpgroups wait for a buffer, read one element of it and release
it. If the probe streams near the copy rate, the ceiling is in the consumers (tensor / shared
memory work per tile); if it stops near 80 % too, the ring itself (bytes in flight) is the limit.

Variants (buffers x tokens per buffer, query tile allocated or not):
  2x64+q  the package kernel's footprint (224 KB with the P tile it also has)
  3x64    three 72 KB buffers: possible only without a shared-memory query tile
  4x32+q  the same bytes as 2x64 in four 36 KB buffers (finer-grained release)
  6x32    six 36 KB buffers, no query tile

State: run 1 (session 5) hung after compiling -- both consumer warpgroups asked for 240 registers,
over the SM's budget with the producer's 80, so ``setmaxnreg.inc`` never returned
(``run1_hang.log``: the device call's limit cut it; no cell finished). Fixed (168).
Run 2 (session 6, ``run2/probe.log``): every ring streams at 89-107 % of the copy rate (B=32 x 8k:
89 % at 4 splits, the large cells 96-107 %), the ring shape makes no difference -- so the ring was
not what held the kernel near 80 %; its consumers were (see ../tilelang_softmax_variants).

Run (one H200, carry [".tlkit"]): see cmd.sh. Prints, per cell, each variant's time and its
fraction of the measured copy rate (L2 flushed, CUDA-graph replays); the package kernel's figures
for the same cells are in ../../run11_tilelang_ws/grid (timed the same way, same machine kind).
"""

import os
import sys

import torch

import tilelang
import tilelang.language as T

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..", "..")))

R, DR, BM = 512, 64, 64


def build(nbuf: int, bn: int, with_q: bool, dtype="bfloat16"):
    H2 = R // 2
    B = T.dynamic("B")
    NSPLIT = T.dynamic("NSPLIT")
    TC = T.dynamic("TC")

    @T.prim_func
    def main(Q: T.Tensor((B, BM, R + DR), dtype), C: T.Tensor((B, TC, R), dtype),
             KR: T.Tensor((B, TC, DR), dtype), SINK: T.Tensor((B, NSPLIT, 256), "float32")):
        with T.Kernel(NSPLIT, B, threads=384) as (pid_p, b):
            K_l = T.alloc_shared([nbuf, bn, H2], dtype)
            K_r = T.alloc_shared([nbuf, bn, H2], dtype)
            K_pe = T.alloc_shared([nbuf, bn, DR], dtype)
            Q_l = T.alloc_shared([BM if with_q else 8, 256], dtype)
            Q_r = T.alloc_shared([BM if with_q else 8, 256], dtype)
            Q_pe = T.alloc_shared([BM if with_q else 8, DR], dtype)
            acc = T.alloc_local([1], "float32")
            full = T.alloc_barrier([128] * nbuf)
            empty = T.alloc_barrier([256] * nbuf)
            bar_q = T.alloc_barrier(128)
            chunk = T.ceildiv(TC, NSPLIT)
            start = pid_p * chunk
            n_iter = T.ceildiv(T.min(chunk, TC - start), bn)
            tx = T.get_thread_binding()
            if tx >= 256:
                T.set_max_nreg(80, 0)
                if with_q:
                    T.tma_copy(Q[b, :, 0:256], Q_l, barrier=bar_q[0])
                    T.tma_copy(Q[b, :, 256:512], Q_r, barrier=bar_q[0])
                    T.tma_copy(Q[b, :, 512:R + DR], Q_pe, barrier=bar_q[0])
                T.barrier_arrive(bar_q[0])
                for t in T.serial(n_iter):
                    s = t % nbuf
                    k0 = start + t * bn
                    T.barrier_wait(empty[s], ((t // nbuf) & 1) ^ 1)
                    T.tma_copy(C[b, k0:k0 + bn, 0:H2], K_l[s, :, :], barrier=full[s])
                    T.tma_copy(C[b, k0:k0 + bn, H2:R], K_r[s, :, :], barrier=full[s])
                    T.tma_copy(KR[b, k0:k0 + bn, :], K_pe[s, :, :], barrier=full[s])
                    T.barrier_arrive(full[s])
            else:
                # both consumer warpgroups together with the producer's 80 must stay within the
                # SM's 64K registers (2 x 128 x 240 + 128 x 80 did not: setmaxnreg.inc waited
                # forever, run1_hang.log); the package kernel asks 240 + 168 + 80
                T.set_max_nreg(168, 1)
                acc[0] = 0.0
                T.barrier_wait(bar_q[0], 0)
                for t in T.serial(n_iter):
                    s = t % nbuf
                    T.barrier_wait(full[s], (t // nbuf) & 1)
                    acc[0] += T.cast(K_l[s, tx % bn, tx % H2], "float32") + \
                        T.cast(K_r[s, tx % bn, tx % H2], "float32") + \
                        T.cast(K_pe[s, tx % bn, tx % DR], "float32")
                    T.barrier_arrive(empty[s])
                if with_q:
                    acc[0] += T.cast(Q_l[tx % BM, tx % 256], "float32") + T.cast(Q_r[tx % BM, tx % 256], "float32")
                SINK[b, pid_p, tx] = acc[0]

    return main


VARIANTS = {"2x64+q": (2, 64, True), "3x64": (3, 64, False), "4x32+q": (4, 32, True), "6x32": (6, 32, False)}


def main():
    from gqla_megatron import bench_decode as bd
    from gqla_megatron.kernels import tilelang_decode as tld

    dev = torch.device("cuda")
    kernels = {name: tilelang.compile(build(*v)) for name, v in VARIANTS.items()}
    flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=dev)
    rates = bd.measure_rates(dev, copy_mib=2048, gemm_n=8192)
    copy = rates["copy_tbps"]
    print(f"copy {copy:.2f} TB/s", flush=True)
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    for B, L in ((32, 8192), (32, 32768), (128, 4096), (128, 8192), (128, 32768)):
        x = bd.make_inputs("absorb", shp, B, L, 1, torch.bfloat16, dev, 0)
        q = torch.randn(B, BM, R + DR, dtype=torch.bfloat16, device=dev)
        nbytes = bd.cache_bytes("absorb", shp, B, L, 2)
        ns = tld.plan_splits(B, shp.heads, L, dev)
        sink = torch.empty(B, ns, 256, dtype=torch.float32, device=dev)
        msg = []
        for name, k in kernels.items():
            t = bd.time_graph(lambda k=k: k(q, x["c"], x["k_rope"], sink), dev, warmup=3, iters=10, flush=flush)
            msg.append(f"{name} {t * 1e6:.1f}us {100 * nbytes / t / 1e12 / copy:.0f}%")
        print(f"B={B} L={L} splits={ns}: " + " | ".join(msg), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--offline":
        for name, v in VARIANTS.items():
            src = tilelang.compile(build(*v), target={"kind": "cuda", "arch": "sm_90a"}).get_kernel_source()
            print(name, "tma_load:", src.count("tma_load("), "ok")
    else:
        main()
