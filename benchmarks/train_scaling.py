"""Multi-GPU training scaling of gqla-pretrain: tensor parallelism (strong scaling, + sequence
parallel) and data parallelism (weak scaling), GQLA and the same-shape GQA, bf16.

    source .devkit/setup.sh && python3 benchmarks/train_scaling.py --gpus 4 --out $OUT

Every layout runs ``torchrun --standalone --nproc_per_node N pretrain/pretrain_gqla.py`` on the
``gqla_1b`` recipe with mock data, micro-batch 2 (--micro-batch-size), one micro-batch per data-parallel rank
per iteration (global batch = micro-batch x DP); median of iterations 4..N of the logged "tokens per s"
(global tokens / step time). Efficiency = tokens/s per GPU relative to the 1-GPU run of the same
attention. Output: train_scaling.json and train_scaling.md under --out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layouts(gpus):
    out = [(1, 1)]
    for n in (2, 4, 8):
        if n <= gpus:
            out += [(n, 1), (1, n)]
    if gpus >= 4:
        out.append((2, 2))
    return out  # (TP, DP)


def run(attention, tp, dp, iters, out_dir, recipe, sp=True, tag="", mbs=2):
    n = tp * dp
    metrics = os.path.join(out_dir, f"m_{attention}_tp{tp}_dp{dp}{tag}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), os.path.join(ROOT, "pretrain", "pretrain_gqla.py"),
           "--recipe", recipe, "--attention", attention, "--mock-data", "--train-iters", str(iters),
           "--tensor-model-parallel-size", str(tp), "--micro-batch-size", str(mbs),
           "--global-batch-size", str(mbs * dp), "--lr-warmup-iters", "2", "--log-interval", "1",
           "--metrics-file", metrics]
    if tp > 1 and sp:
        cmd.append("--sequence-parallel")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    row = {"attention": attention, "tp": tp, "dp": dp, "gpus": n, "sp": sp and tp > 1,
           "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"), "returncode": r.returncode,
           "wall_s": round(time.time() - t0, 1)}
    if r.returncode == 0 and os.path.exists(metrics):
        ms = [json.loads(line) for line in open(metrics)][3:]
        row.update(tokens_per_s=statistics.median(m["tokens per s"] for m in ms),
                   step_s=statistics.median(m["step time s"] for m in ms),
                   tflops_per_gpu=statistics.median(m["TFLOP/s per GPU"] for m in ms),
                   mem_gib=max(m["memory GiB"] for m in ms))
    else:
        row["error"] = (r.stdout + r.stderr)[-1500:]
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--recipe", default="gqla_1b")
    p.add_argument("--attention", nargs="+", default=["gqla", "gqa"])
    p.add_argument("--layouts", nargs="+", help="only these TPxDP layouts, e.g. 2x1 4x1")
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--out", default=".")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for att in a.attention:
        # the baseline only for tensor parallelism (its DP scaling is the same Megatron DDP)
        todo = [l for l in layouts(a.gpus) if att == "gqla" or l[1] == 1]
        if a.layouts:
            todo = [tuple(int(x) for x in l.split("x")) for l in a.layouts]
        for tp, dp in todo:
            row = run(att, tp, dp, a.iters, a.out, a.recipe, sp=not a.no_sequence_parallel, tag=a.tag, mbs=a.micro_batch_size)
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(os.path.join(a.out, f"train_scaling{a.tag}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    one = {r["attention"]: r for r in rows if r["gpus"] == 1 and "tokens_per_s" in r}
    lines = [f"recipe {a.recipe}, bf16, TE spec, micro-batch {a.micro_batch_size}, global batch {a.micro_batch_size} x DP, median of iterations 4..{a.iters}",
             "", "| attention | TP | DP | GPUs | tokens/s | per GPU | efficiency vs 1 GPU | step s | TFLOP/s/GPU | mem GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['attention']} | {r['tp']} | {r['dp']} | {r['gpus']} | failed (rc {r['returncode']}) |")
            continue
        base = one.get(r["attention"])
        eff = f"{r['tokens_per_s'] / r['gpus'] / base['tokens_per_s']:.3f}" if base else ""
        lines.append(f"| {r['attention']} | {r['tp']} | {r['dp']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / r['gpus']:,.0f} | {eff} | {r['step_s']:.4f} | {r['tflops_per_gpu']:.1f} | "
                     f"{r['mem_gib']:.1f} |")
    open(os.path.join(a.out, f"train_scaling{a.tag}.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
