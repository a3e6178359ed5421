"""EXPERIMENT (session 7): where do the absorb kernel's ~13-20 us per call go?

Session 6 (../fixed_cost) found that a 32-tile-per-program call (the split cells B=8 x 32k and
B=32 x 8k, and B=128 x 2k) costs ~13-20 us more than its tiles at the steady per-tile rate,
while the same kernel at 128 tiles per program runs at the copy rate. This run timestamps the
package TileLang kernel from the inside: a copy of ``gqla_megatron/kernels/tilelang_decode.py``
with a per-program stamp table (``%globaltimer`` in ns, and the SM's ``clock64``) written at
  0 entry (thread 0, before the roles split)   6 scores: query tile landed
  2 scores: first latent tile landed           3 scores: KV loop done (last P.V issued)
  4 scores: its half of the output stored      7 right: KV loop done
  5 right: its half stored                     1 producer: last TMA load issued
The patched copy is written to a temporary directory and imported (the package file is not
changed; TileLang parses the kernel source from that file). Each cell is timed as the grid
times it (CUDA-graph replay, write flush before each replay), and the stamps of the last
replay are summarised across programs: entry spread, first-tile latency, loop time, epilogue,
finish spread, and the kernel span (first entry to last store) against the graph-timed call.

Results. Run 1 (``run1.log``, the kernel at commit 8ad831b): per program ~5-8 us until the first
latent tile lands (all 128 programs ask for the query and two tiles at once), the KV loop at
2.04 us per tile over 129 tiles but 2.16-2.38 over 32, then **6.4-11 us from the last P.V to the
last output store** (the same with 32 programs alone: not bandwidth), finish spread (median to
last) 2-4 us; the graph-timed call is 5-9 us longer than the kernel span (graph launch, flush
write-back, the combine). Run 2 (``run2.log``, after the epilogue change -- 1 / l once per row,
output staged in shared memory, 16-byte stores; ../epilogue_ab) : the epilogue 1.9-2.1 us
direct, 3.7-4.6 us with fp32 split partials; everything else unchanged.

Run (one H200, carry [".tlkit"]): cmd.sh (run 1); run 2 came from ../epilogue_ab/cmd.sh
"""

import os
import re
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(HERE))

from ab_graphs import load_kernel_module  # noqa: E402
from gqla_megatron import bench_decode as bd  # noqa: E402

PRELUDE = r'''
__device__ __forceinline__ long long gqla_gt() { unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return (long long)t; }
__device__ __forceinline__ long long gqla_clk() { return (long long)clock64(); }
'''

STAMP_MACRO = '''
    @T.macro
    def stamp(TS, b, pid_m, pid_p, k):
        TS[b, pid_m, pid_p, k] = T.call_extern("int64", "gqla_gt")
        TS[b, pid_m, pid_p, k + 8] = T.call_extern("int64", "gqla_clk")

    @T.macro
    def load_tile('''


def _sub(src: str, old: str, new: str, count: int = 1) -> str:
    n = src.count(old)
    if n != count:
        raise SystemExit(f"patch anchor found {n} times (want {count}): {old[:70]!r}")
    return src.replace(old, new)


def patched_source() -> str:
    src = open(os.path.join(ROOT, "gqla_megatron", "kernels", "tilelang_decode.py")).read()
    src = _sub(src, "\n    @T.macro\n    def load_tile(", STAMP_MACRO)
    src = _sub(src, "    MAXP = T.dynamic(\"MAXP\")      # paged: block-table width\n",
               "    MAXP = T.dynamic(\"MAXP\")      # paged: block-table width\n"
               "    MBK = T.dynamic(\"MBK\")\n    NSP = T.dynamic(\"NSP\")\n")
    src = _sub(src, "cap, nsplit, pid_p, pid_m, b, OUT, LSE):", "cap, nsplit, pid_p, pid_m, b, OUT, LSE, TS):")
    src = _sub(src, "        tx = T.get_thread_binding()\n",
               "        tx = T.get_thread_binding()\n        if tx == 0:\n            stamp(TS, b, pid_m, pid_p, 0)\n")
    src = _sub(src, "                    load_tile(C, KR, BT, b, k0 + BN, K1_l, K1_r, K1_pe, full, 1)\n",
               "                    load_tile(C, KR, BT, b, k0 + BN, K1_l, K1_r, K1_pe, full, 1)\n"
               "            if tx == 256:\n                stamp(TS, b, pid_m, pid_p, 1)\n")
    src = _sub(src, "            T.barrier_wait(bar_q[0], 0)\n",
               "            T.barrier_wait(bar_q[0], 0)\n            if tx == 0:\n                stamp(TS, b, pid_m, pid_p, 6)\n")
    src = _sub(src, "                T.barrier_wait(full[t % 2], (t // 2) & 1)\n",
               "                T.barrier_wait(full[t % 2], (t // 2) & 1)\n                if t == 0:\n"
               "                    if tx == 0:\n                        stamp(TS, b, pid_m, pid_p, 2)\n")
    src = _sub(src, "            T.barrier_arrive(done[0])\n",
               "            if tx == 0:\n                stamp(TS, b, pid_m, pid_p, 3)\n            T.barrier_arrive(done[0])\n")
    src = re.sub(r"(\n            store\(OUT, LSE, acc_l, [^\n]*\n)",
                 r"\1            if tx == 0:\n                stamp(TS, b, pid_m, pid_p, 4)\n", src, count=1)
    src = _sub(src, "            T.barrier_wait(done[0], 0)\n",
               "            if tx == 128:\n                stamp(TS, b, pid_m, pid_p, 7)\n            T.barrier_wait(done[0], 0)\n")
    src = re.sub(r"(\n            store\(OUT, LSE, acc_r, [^\n]*\n)",
                 r"\1            if tx == 128:\n                stamp(TS, b, pid_m, pid_p, 5)\n", src, count=1)
    src = _sub(src, "qk_scale: T.float32, heads: T.int32, cap: T.int32):",
               "qk_scale: T.float32, heads: T.int32, cap: T.int32, TS: T.Tensor((B, MBK, NSP, 16), \"int64\")):", 2)
    src = _sub(src, "threads=THREADS) as", "threads=THREADS, prelude=PRELUDE) as", 2)
    src = _sub(src, "pid_p, pid_m, b, OUT, OUT)", "pid_p, pid_m, b, OUT, OUT, TS)")
    src = _sub(src, "pid_p, pid_m, b, OPART, LSE)", "pid_p, pid_m, b, OPART, LSE, TS)")
    src = _sub(src, "o2, qk_scale, H, cap)", "o2, qk_scale, H, cap, _TS[0])")
    src = _sub(src, "opart, lse, qk_scale, H, cap)", "opart, lse, qk_scale, H, cap, _TS[0])")
    return src + f"\n\nPRELUDE = {PRELUDE!r}\n_TS = [None]\n"


def load_patched():
    return load_kernel_module(patched_source(), "tld_stamped")


def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]


def summarise(ts: torch.Tensor, n_iter_hint: int) -> str:
    t = ts.view(-1, 16).cpu().tolist()
    t = [r for r in t if r[0] > 0]
    t0 = min(r[0] for r in t)
    us = lambda v: v / 1e3  # noqa: E731
    entry = [us(r[0] - t0) for r in t]
    qlat = [us(r[6] - r[0]) for r in t]
    first = [us(r[2] - r[0]) for r in t]
    loop = [us(r[3] - r[2]) for r in t]
    epi = [us(max(r[4], r[5]) - r[3]) for r in t]
    finish = [us(max(r[4], r[5]) - t0) for r in t]
    right_lag = [us(r[7] - r[3]) for r in t]
    span = max(finish)
    per_tile = statistics.median(loop) / max(1, n_iter_hint - 1)
    f = lambda name, xs: (f"{name} min/med/max {min(xs):6.2f}/{statistics.median(xs):6.2f}/"  # noqa: E731
                          f"{max(xs):6.2f}")
    return (f"programs {len(t)}, kernel span {span:6.2f} us (first entry -> last store); "
            + "; ".join([f("entry", entry), f("query landed", qlat), f("first tile landed", first),
                         f("loop", loop), f("right after scores", right_lag), f("epilogue", epi),
                         f("finish", finish)])
            + f"; finish p10/p50/p90 {q(finish, .1):.2f}/{q(finish, .5):.2f}/{q(finish, .9):.2f}"
            + f"; loop per tile (median, {n_iter_hint} tiles) {per_tile:.3f} us")


def main():
    dev = torch.device("cuda")
    tld = load_patched()
    rates = bd.measure_rates(dev, copy_mib=1024, gemm_n=8192)
    print(f"copy {rates['copy_tbps']:.2f} TB/s", flush=True)
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    flush = bd.L2Flush(dev, "write")
    cells = ((128, 2048, 1, None), (128, 8192, 1, None), (32, 8192, 1, None), (8, 32768, 1, None),
             (32, 8192, 2, None), (32, 8192, 1, 1), (128, 512, 1, None))
    if len(sys.argv) > 1:   # B,L,S[,splits] ... (run 3: the B = 1 cells)
        cells = [tuple(int(v) for v in a.split(",")) + (None,) * (4 - len(a.split(","))) for a in sys.argv[1:]]
    for B, L, S, ns in cells:
        x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0)
        rows = S * shp.heads
        nsplit = ns or tld.plan_splits(B, rows, L, dev)
        tld._TS[0] = torch.zeros(B, -(-rows // 64), nsplit, 16, dtype=torch.int64, device=dev)
        out = torch.empty_like(x["q"])
        fn = lambda: tld.absorb_decode(x["q"], x["q_rope"], x["c"], x["k_rope"], x["lengths"], x["scale"],  # noqa: E731
                                       out=out, max_len=x["L"], validate=False, num_splits=nsplit)
        nbytes = bd.cache_bytes("absorb", shp, B, L, 2) + bd.qo_bytes("absorb", shp, B, S, 2)
        ideal = nbytes / (rates["copy_tbps"] * 1e12) * 1e6
        t = bd.time_graph(fn, dev, warmup=3, iters=30, flush=flush) * 1e6
        torch.cuda.synchronize(dev)
        n_iter = -(-((L + S) // nsplit) // 64)
        print(f"B={B:3d} L={L:5d} s_q={S} splits={nsplit:2d} ({n_iter} tiles/program): graph-timed call "
              f"{t:6.1f} us ({ideal / t:4.0%} of copy; copy-rate time {ideal:.1f} us)", flush=True)
        print("   " + summarise(tld._TS[0], n_iter), flush=True)
        del x, out


if __name__ == "__main__":
    main()
