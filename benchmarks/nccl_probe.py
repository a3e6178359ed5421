"""Collective latency and bandwidth between the GPUs of one host (what tensor parallelism pays).

    torchrun --standalone --nproc_per_node 2 benchmarks/nccl_probe.py --out $OUT

all_gather / reduce_scatter / all_reduce of bf16 tensors from 64 KiB to 256 MiB (total size per
rank), median of 20 after 5 warm-up calls; bus bandwidth as nccl-tests defines it
(all_gather / reduce_scatter: size*(n-1)/n / t; all_reduce: 2*size*(n-1)/n / t).
"""

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    a = p.parse_args()
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rows = []
    for size in [1 << k for k in range(16, 29, 2)]:
        numel = size // 2
        x = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(numel * n, device="cuda", dtype=torch.bfloat16)
        rs = torch.empty(numel // n, device="cuda", dtype=torch.bfloat16)
        ops = {"all_gather": (lambda: dist.all_gather_into_tensor(out, x), (n - 1) * size),
               "reduce_scatter": (lambda: dist.reduce_scatter_tensor(rs, x), size * (n - 1) / n),
               "all_reduce": (lambda: dist.all_reduce(x), 2 * size * (n - 1) / n)}
        for name, (fn, bus_bytes) in ops.items():
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(20):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e) / 1e3)
            t = statistics.median(ts)
            rows.append({"op": name, "ranks": n, "bytes_per_rank": size, "time_us": t * 1e6,
                         "bus_GBps": bus_bytes / t / 1e9})
    if rank == 0:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"nccl_probe_{n}gpu.json"), "w") as f:
            json.dump(rows, f, indent=1)
        for r in rows:
            print(f"{r['op']:>15} {r['ranks']} ranks {r['bytes_per_rank'] / 2**20:8.2f} MiB "
                  f"{r['time_us']:9.1f} us {r['bus_GBps']:7.1f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
