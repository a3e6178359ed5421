"""EXPERIMENT (session 7): the gqa kernel at B = 1 -- which split count and tile shape, under the
grid's timing (CUDA-graph replays, write flush before each)?

gqa B = 1 x 8k measures 38 % of the copy rate (21.4 us for 34.6 MB; the issue asks >= 60 %). The
default config (16-row tiles x 64 keys, 4 warps, 3 stages, two programs per SM) and the split
heuristic (waves 2 -> 32 splits x 8 groups = 256 programs at 8k) were tuned on large cells and
on eager timing (sweep1). This times, at B = 1 x {8k, 32k} (s_q 1) and B = 1 x 8k s_q 2, every
split count in SPLITS with each tile shape in TILES, the whole call and the split kernel alone
(the combine pass replaced by nothing: its output is then garbage, only the time counts).

Run 1 (``run1.log``): flat. Every split count from 16 to 32 and every tile shape lands within
21.0-22.8 us at 8k (the default 21.7 us; best 21.1 us at 16 splits), the split kernel alone
18.6-20 us; at 32k 49.9-51 us (65 %). From 8k to 32k the call grows 28 us for 24.4 us more
copy-rate bytes (~85 % of the copy rate at the margin), so ~11 us of the 8k call is fixed: the
graph launch (3.3 us for one tiny kernel in run 16), the combine pass (~2.5 us), the write
flush's dirty L2 lines written back during the call (~4 us here: 46 % under a read flush in run
14), and the kernel's own start and drain. No configuration moves it: the 60 % target at 8k
(13.5 us for the whole call) would leave ~6 us for 34.6 MB after the launch and the write-back.

Run (one H200): cmd.sh
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..", "..")))

from gqla_megatron import bench_decode as bd  # noqa: E402
from gqla_megatron.kernels import triton_decode as td  # noqa: E402

SPLITS = (8, 16, 24, 32, 48, 64, 96)
TILES = ((64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (128, 8, 3), (32, 4, 4), (256, 8, 2))


def main():
    dev = torch.device("cuda")
    rates = bd.measure_rates(dev, copy_mib=1024, gemm_n=8192)
    print(f"copy {rates['copy_tbps']:.2f} TB/s", flush=True)
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    flush = bd.L2Flush(dev, "write")
    real_combine = td._run_combine
    for B, L, S in ((1, 8192, 1), (1, 32768, 1), (1, 8192, 2)):
        x = bd.make_inputs("gqa", shp, B, L, S, torch.bfloat16, dev, 0)
        nbytes = bd.cache_bytes("gqa", shp, B, L, 2) + bd.qo_bytes("gqa", shp, B, S, 2)
        ideal = nbytes / (rates["copy_tbps"] * 1e12) * 1e6
        fn0, _, note = bd._method_triton("gqa", shp, x)
        t0 = bd.time_graph(fn0, dev, warmup=3, iters=30, flush=flush) * 1e6
        print(f"\nB={B} L={L} s_q={S}: default {t0:.1f} us ({ideal / t0:.0%} of copy), splits "
              f"{note['num_splits']}; copy-rate time {ideal:.1f} us", flush=True)
        rows = []
        for bn, nw, ns in TILES:
            for sp in SPLITS:
                cfg = td.DecodeKernelConfig(block_n=bn, num_warps=nw, num_stages=ns, num_splits=sp)
                try:
                    fn, _, _ = bd._method_triton("gqa", shp, x, config=cfg)
                    t = bd.time_graph(fn, dev, warmup=3, iters=30, flush=flush) * 1e6
                    td._run_combine = lambda *a, **k: None
                    try:
                        tk = bd.time_graph(fn, dev, warmup=3, iters=30, flush=flush) * 1e6
                    finally:
                        td._run_combine = real_combine
                except Exception as e:
                    print(f"  block_n {bn:3d} warps {nw} stages {ns} splits {sp:3d}: n/a ({str(e).splitlines()[0][:90]})")
                    continue
                rows.append((t, tk, bn, nw, ns, sp))
        rows.sort()
        for t, tk, bn, nw, ns, sp in rows[:12]:
            print(f"  {t:6.1f} us ({ideal / t:4.0%})  split kernel alone {tk:6.1f} us  block_n {bn:3d} warps {nw} "
                  f"stages {ns} splits {sp:3d}", flush=True)
        del x


if __name__ == "__main__":
    main()
