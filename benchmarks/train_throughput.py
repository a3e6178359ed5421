"""Training throughput of GQLA vs same-shape MLA and GQA, bf16 and FP8, on one GPU.

    source .devkit/setup.sh && python3 benchmarks/train_throughput.py --recipe gqla_1b --iters 12 --out $OUT

Each configuration runs ``pretrain/pretrain_gqla.py`` (TE spec, mock data, one micro-batch per
iteration) in its own process; the median of iterations 4..N is reported, with tokens/s, model
TFLOP/s per GPU (FLOPs counted by gqla_megatron.training.models.flops_per_iteration), MFU
against the bf16 dense peak (989) and against a bf16 matmul rate measured in the same run, peak
memory, and ratios against the same-shape GQA in bf16.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def matmul_tflops(n=8192, reps=20):
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="gqla_1b")
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--attention", nargs="+", default=["gqla", "mla", "gqa"])
    p.add_argument("--precision", nargs="+", default=["bf16", "fp8"])
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--out", default=".")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    measured = matmul_tflops()
    rows = []
    for prec in a.precision:
        for att in a.attention:
            metrics = os.path.join(a.out, f"m_{att}_{prec}.jsonl")
            if os.path.exists(metrics):
                os.remove(metrics)
            cmd = [sys.executable, os.path.join(ROOT, "pretrain", "pretrain_gqla.py"), "--recipe", a.recipe,
                   "--attention", att, "--mock-data", "--train-iters", str(a.iters),
                   "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.micro_batch_size),
                   "--lr-warmup-iters", "2", "--log-interval", "4", "--metrics-file", metrics]
            if prec == "fp8":
                cmd += ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"]
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True)
            row = {"attention": att, "precision": prec, "returncode": r.returncode, "wall_s": time.time() - t0}
            if r.returncode == 0:
                ms = [json.loads(l) for l in open(metrics)][3:]
                med = lambda k: statistics.median(m[k] for m in ms)  # noqa: E731
                row.update(step_s=med("step time s"), tokens_per_s=med("tokens per s"),
                           tflops=med("TFLOP/s per GPU"), mfu_989=med("MFU"),
                           mfu_measured=med("TFLOP/s per GPU") / measured, mem_gib=max(m["memory GiB"] for m in ms),
                           final_loss=ms[-1]["lm loss"])
            else:
                row["error"] = (r.stdout + r.stderr)[-1500:]
            print(json.dumps(row), flush=True)
            rows.append(row)
    base = {r["precision"]: r for r in rows if r["attention"] == "gqa" and "tokens_per_s" in r}
    bf16 = {r["attention"]: r for r in rows if r["precision"] == "bf16" and "tokens_per_s" in r}
    lines = [f"measured bf16 matmul 8192^3: {measured:.0f} TFLOP/s", "",
             "| attention | precision | step s | tokens/s | TFLOP/s/GPU | MFU (989) | MFU (measured) | mem GiB | vs GQA same precision | FP8/bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['attention']} | {r['precision']} | failed (rc {r['returncode']}) | | | | | | | |")
            continue
        vs = r["tokens_per_s"] / base[r["precision"]]["tokens_per_s"] if r["precision"] in base else float("nan")
        f8 = (r["tokens_per_s"] / bf16[r["attention"]]["tokens_per_s"]
              if r["precision"] == "fp8" and r["attention"] in bf16 else float("nan"))
        lines.append(f"| {r['attention']} | {r['precision']} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops']:.1f} | {100 * r['mfu_989']:.1f} % | {100 * r['mfu_measured']:.1f} % | "
                     f"{r['mem_gib']:.1f} | {vs:.3f} | {f8:.3f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "train_throughput.json"), "w") as f:
        json.dump({"measured_bf16_matmul_tflops": measured, "rows": rows}, f, indent=1)
    with open(os.path.join(a.out, "train_throughput.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
