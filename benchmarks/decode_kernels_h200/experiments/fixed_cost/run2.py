"""EXPERIMENT (session 6), run 2: is the ~15-19 us per-call cost in the kernel or in the timing?

Times a CUDA graph holding one call and one holding two back-to-back calls of the same decode
(write flush before each replay, as the grid). The second call starts with L2 holding the first
call's last ~50 MB (clean) and no flush write-back, no graph launch: t(2 calls) - t(1 call) is
one call's marginal cost. Cells read >= 300 MB, so the second call's data comes from HBM too.
Also the same with the read flush.

Run (one H200, carry [".tlkit"]): cmd2.sh
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..", "..")))

from gqla_megatron import bench_decode as bd  # noqa: E402


def main():
    dev = torch.device("cuda")
    rates = bd.measure_rates(dev, copy_mib=1024, gemm_n=8192)
    print(f"copy {rates['copy_tbps']:.2f} TB/s", flush=True)
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    for B, L, S in ((128, 2048, 1), (32, 8192, 1), (8, 32768, 1), (32, 8192, 2), (128, 8192, 1)):
        x = bd.make_inputs("absorb", shp, B, L, S, torch.bfloat16, dev, 0)
        nbytes = bd.cache_bytes("absorb", shp, B, L, 2) + bd.qo_bytes("absorb", shp, B, S, 2)
        ideal = nbytes / (rates["copy_tbps"] * 1e12) * 1e6
        for kern, m in (("tilelang", bd._method_tilelang), ("triton", bd._method_triton)):
            fn, _, note = m("absorb", shp, x)
            parts = []
            for mode in ("write", "read"):
                f = bd.L2Flush(dev, mode)
                one = bd.time_graph(fn, dev, warmup=3, iters=30, flush=f) * 1e6
                two = bd.time_graph(lambda: (fn(), fn()), dev, warmup=3, iters=30, flush=f) * 1e6
                parts.append(f"{mode}: 1 call {one:6.1f} us ({ideal / one:4.0%}), 2 calls {two:6.1f}, "
                             f"marginal {two - one:6.1f} ({ideal / (two - one):4.0%})")
                del f
            print(f"{kern:8s} B={B:3d} L={L:5d} s_q={S} splits={note.get('num_splits')} (copy-rate time "
                  f"{ideal:.1f} us): " + " | ".join(parts), flush=True)
        del x


if __name__ == "__main__":
    main()
