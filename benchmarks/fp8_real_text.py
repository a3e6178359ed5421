"""FP8 vs bf16 on real text: the same GQLA run twice, loss curves compared.

    source .devkit/setup.sh && python3 benchmarks/fp8_real_text.py --data-path .gpudata/pydocs_train_text_document \\
        --vocab-size 16384 --iters 300 --out $OUT

Data: the Python 3.11 documentation sources (Debian python3.11-doc, *.rst.txt, 95 % of the files;
5 % held out), tokenized with a 16k byte-level BPE trained on the training files
(benchmarks/fp8_real_text_h200/README.md has the exact preprocessing commands).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="gqla_125m")
    p.add_argument("--data-path", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--out", default=".")
    a = p.parse_args()
    res = {}
    for prec in ("bf16", "fp8"):
        metrics = os.path.join(a.out, f"loss_{prec}.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)
        cmd = [sys.executable, os.path.join(ROOT, "pretrain", "pretrain_gqla.py"), "--recipe", a.recipe,
               "--data-path", a.data_path, "--split", "100,0,0", "--vocab-size", str(a.vocab_size),
               "--seq-length", str(a.seq_length), "--micro-batch-size", str(a.micro_batch_size),
               "--global-batch-size", str(a.global_batch_size), "--train-iters", str(a.iters),
               "--lr-warmup-iters", "30", "--log-interval", "50", "--metrics-file", metrics,
               "--data-cache-path", os.path.join(a.out, "cache")]
        if prec == "fp8":
            cmd += ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(prec, "failed", (r.stdout + r.stderr)[-2000:])
            continue
        ms = [json.loads(l) for l in open(metrics)]
        last = ms[-20:]
        res[prec] = {"final_loss_mean_last20": statistics.mean(m["lm loss"] for m in last),
                     "tokens_per_s_median": statistics.median(m["tokens per s"] for m in ms[5:]),
                     "loss_at": {str(m["iteration"]): m["lm loss"] for m in ms if m["iteration"] % 50 == 0}}
        print(prec, json.dumps(res[prec]), flush=True)
    if len(res) == 2:
        b, f = res["bf16"]["final_loss_mean_last20"], res["fp8"]["final_loss_mean_last20"]
        res["fp8_vs_bf16_final_loss_rel"] = (f - b) / b
        res["fp8_speedup"] = res["fp8"]["tokens_per_s_median"] / res["bf16"]["tokens_per_s_median"]
        print(f"final loss (mean of last 20 iterations): bf16 {b:.4f}, fp8 {f:.4f}, "
              f"relative {100 * (f - b) / b:+.2f} %; FP8 speed-up {res['fp8_speedup']:.3f}x")
    with open(os.path.join(a.out, "fp8_real_text.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
