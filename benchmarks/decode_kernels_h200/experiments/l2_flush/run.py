"""EXPERIMENT (session 6): what the L2 flush before each timed call charges to the kernel.

The decode grid flushed L2 by zeroing a 256 MiB buffer before each timed graph replay (as
triton.testing.do_bench does). That leaves L2 (50 MB on an H200) full of dirty lines, which the
timed kernel's reads must write back to HBM first. A straight-line fit of the TileLang absorb
kernel's time over tiles per program (session 6, run 13) left a ~14 us intercept per call -- about
50 MB at the copy rate -- so this measures, for the same graph replays:
  * a read-only kernel (amax over 64 MiB - 1 GiB) and a one-element kernel,
  * our decode kernels at a few cells,
under no flush, the write flush (zero 256 MiB) and a read flush (amax over the same 256 MiB:
L2 left holding clean lines, as after the weight-reading GEMMs before attention in a decode
step). If the write flush's extra time is the same ~constant for every kernel that reads more
than L2 holds, it is the write-back, not the kernel.

Run (one H200, carry [".tlkit"]): see cmd.sh.
"""

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..", "..")))

from gqla_megatron import bench_decode as bd  # noqa: E402


def main():
    dev = torch.device("cuda")
    flushes = {"none": None, "write": bd.L2Flush(dev, "write"), "read": bd.L2Flush(dev, "read")}
    rates = bd.measure_rates(dev, copy_mib=1024, gemm_n=8192)
    print(f"copy {rates['copy_tbps']:.2f} TB/s", flush=True)
    out = {"rates": rates, "rows": []}

    def row(name, fn, nbytes):
        ts = {k: bd.time_graph(fn, dev, warmup=3, iters=30, flush=f) * 1e6 for k, f in flushes.items()}
        r = {"name": name, "bytes": nbytes, "us": ts}
        out["rows"].append(r)
        extra = ts["write"] - ts["read"]
        print(f"{name:42s} none {ts['none']:8.1f} us | write {ts['write']:8.1f} | read {ts['read']:8.1f} | "
              f"write - read {extra:6.1f} us" + (f" | read-flush {nbytes / ts['read'] / 1e6:.2f} TB/s "
                                                f"({nbytes / ts['read'] / 1e6 / rates['copy_tbps']:.0%} of copy), "
                                                f"write-flush {nbytes / ts['write'] / 1e6 / rates['copy_tbps']:.0%}"
                                                if nbytes else ""), flush=True)

    x = torch.zeros(1, device=dev)
    row("one-element kernel", lambda: x.add_(1), 0)
    sink = torch.empty((), device=dev)
    for mib in (16, 64, 256, 1024):
        buf = torch.rand(mib * 2 ** 18, device=dev)
        row(f"amax over {mib} MiB", lambda: torch.amax(buf, dim=0, out=sink), mib * 2 ** 20)
        del buf
    shp = bd.Shapes(**bd.SHAPES["llama3-8b"])
    for B, L in ((1, 8192), (1, 32768), (32, 8192), (128, 8192), (128, 32768)):
        for path, kernels in (("absorb", ("tilelang", "triton")), ("gqa", ("triton",))):
            xs = bd.make_inputs(path, shp, B, L, 1, torch.bfloat16, dev, 0)
            nbytes = bd.cache_bytes(path, shp, B, L, 2) + bd.qo_bytes(path, shp, B, 1, 2)
            for k in kernels:
                fn, _, _ = (bd._method_tilelang if k == "tilelang" else bd._method_triton)(path, shp, xs)
                row(f"{k} {path} B={B} L={L}", fn, nbytes)
            del xs
    with open(os.path.join(os.environ.get("OUT", "."), "l2_flush.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
