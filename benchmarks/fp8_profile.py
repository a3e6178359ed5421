"""Where the time goes under FP8: GQLA vs same-shape GQA, bf16 vs FP8, kernel categories.

    source .devkit/setup.sh && python3 benchmarks/fp8_profile.py --out $OUT

Builds the ``gqla_1b`` recipe's GPTModel (TE spec, bf16 weights, no DDP / optimizer: the bare
forward+backward that FP8 accelerates) with ``--layers`` layers, times fwd+bwd with CUDA events
(median of ``--iters`` after warm-up), then profiles a few steps with torch.profiler and sums the
CUDA kernel time per category (GEMM bf16 / GEMM fp8, FP8 cast+transpose, amax/scale updates,
attention, norms, RoPE, other elementwise). Variants: precision {bf16, fp8 hybrid delayed with
amax history 1} x ``apply_rope_fusion`` {off (the training loop's setting), on}.
Output: fp8_profile.json and fp8_profile.md under --out.
"""

import argparse
import json
import os
import re
import statistics
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CATEGORIES = [  # first match wins; matched against the lower-cased kernel name
    ("attention", r"fmha|flash|cudnn|fused_attn|attn"),
    ("gemm_fp8", r"e4m3|e5m2|fp8.*gemm|gemm.*fp8|nvjet_sm90_q[qr]"),  # nvjet q*: quantized inputs
    ("gemm", r"gemm|nvjet|cutlass|xmma|sm90_|s16816|wgmma"),
    ("fp8_cast_transpose", r"cast|transpose|quantize|dequant"),
    ("fp8_amax_scale", r"amax|scale|delayed|fp8"),
    ("norm", r"norm"),
    ("rope", r"rope|rotary"),
    ("copy_cat", r"copy|cat|memcpy|memset|fill"),
]


def category(name: str) -> str:
    n = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, n):
            return cat
    return "other_elementwise"


def build(attention, layers, fp8, rope_fusion, seq, mbs):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from gqla_megatron.training.models import build_model, transformer_config
    from gqla_megatron.training.recipes import get_recipe

    r = get_recipe("gqla_1b")
    common = dict(num_layers=layers, hidden_size=r["hidden_size"], ffn_hidden_size=r["ffn_hidden_size"],
                  num_attention_heads=r["num_attention_heads"], params_dtype=torch.bfloat16, bf16=True,
                  gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
                  hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02, layernorm_epsilon=1e-5,
                  gradient_accumulation_fusion=False, bias_activation_fusion=True, bias_dropout_fusion=True,
                  masked_softmax_fusion=False, apply_rope_fusion=rope_fusion, persist_layer_norm=False)
    if fp8:
        common.update(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1,
                      fp8_amax_compute_algo="most_recent")
    shape = {k: r[k] for k in ("num_query_groups", "kv_lora_rank", "q_lora_rank", "qk_head_dim",
                               "qk_pos_emb_head_dim", "v_head_dim")}
    cfg = transformer_config(attention, common, shape)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    model = build_model(attention, cfg, vocab_size=r["vocab_size"], seq_length=seq, backend="te").cuda()
    tokens = torch.randint(0, r["vocab_size"], (mbs, seq), device="cuda")
    pos = torch.arange(seq, device="cuda")[None].expand(mbs, seq)
    return model, cfg, tokens, pos


def step_fn(model, cfg, tokens, pos):
    # no FP8 context here: Megatron's TransformerBlock enters it itself when config.fp8 is set,
    # exactly as in training (the LM head stays bf16)
    def step():
        loss = model(tokens, pos, None, labels=tokens).float().mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad = None
    return step


def measure(attention, layers, fp8, rope_fusion, iters, seq, mbs):
    import torch

    model, cfg, tokens, pos = build(attention, layers, fp8, rope_fusion, seq, mbs)
    step = step_fn(model, cfg, tokens, pos)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    per_cat, per_kernel = defaultdict(float), defaultdict(float)
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t <= 0 or e.key.startswith("ProfilerStep"):
            continue
        per_cat[category(e.key)] += t / 3 / 1e3  # ms per step
        per_kernel[e.key] += t / 3 / 1e3
    del model
    torch.cuda.empty_cache()
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {"attention": attention, "precision": "fp8" if fp8 else "bf16", "rope_fusion": rope_fusion,
            "layers": layers, "step_s": statistics.median(times), "tokens_per_s": mbs * seq / statistics.median(times),
            "kernel_ms_per_step": dict(per_cat), "top_kernels_ms": top, "kernels_ms": dict(per_kernel)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--attention", nargs="+", default=["gqla", "gqa"])
    p.add_argument("--rope-fusion", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--out", default=".")
    p.add_argument("--render", help="only re-render the markdown from this fp8_profile.json")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.render:
        return render(json.load(open(a.render)), a)
    import torch
    import torch.distributed as dist

    import gqla_megatron.megatron  # noqa: F401  (package init: the GQLA layer registry)
    torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29511", rank=0, world_size=1)
    rows = []
    for att in a.attention:
        for rope_fusion in [v == "on" for v in a.rope_fusion]:
            for fp8 in (False, True):
                try:
                    row = measure(att, a.layers, fp8, rope_fusion, a.iters, a.seq_length, a.micro_batch_size)
                except Exception as e:  # report and go on: one variant failing is a finding
                    row = {"attention": att, "precision": "fp8" if fp8 else "bf16", "rope_fusion": rope_fusion,
                           "error": f"{type(e).__name__}: {e}"[:600]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    with open(os.path.join(a.out, "fp8_profile.json"), "w") as f:
        json.dump(rows, f, indent=1)
    render(rows, a)


def render(rows, a):
    for r in rows:  # re-categorise from the per-kernel times when the JSON has them
        if "kernels_ms" in r:
            cat = defaultdict(float)
            for k, v in r["kernels_ms"].items():
                cat[category(k)] += v
            r["kernel_ms_per_step"] = dict(cat)
    cats = sorted({c for r in rows for c in r.get("kernel_ms_per_step", {})})
    lines = [f"{a.layers} layers of gqla_1b, seq {a.seq_length}, micro-batch {a.micro_batch_size}, fwd+bwd, "
             "kernel ms per step (torch.profiler, CUDA time)", "",
             "| attention | precision | rope fusion | step s | tokens/s | FP8/bf16 | kernel sum ms | GPU idle | "
             + " | ".join(cats) + " |", "|---|---|---|---|---|---|---|---|" + "---|" * len(cats)]
    ok = {(r["attention"], r["precision"], r["rope_fusion"]): r for r in rows if "step_s" in r}
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['attention']} | {r['precision']} | {r['rope_fusion']} | error: {r['error'][:120]} |")
            continue
        b = ok.get((r["attention"], "bf16", r["rope_fusion"]))
        busy = sum(r["kernel_ms_per_step"].values())  # profiled steps; idle = step time not covered
        ratio = f"{b['step_s'] / r['step_s']:.3f}" if b and r["precision"] == "fp8" else ""
        lines.append(f"| {r['attention']} | {r['precision']} | {r['rope_fusion']} | {r['step_s']:.4f} | "
                     f"{r['tokens_per_s']:,.0f} | {ratio} | {busy:.1f} | {1 - busy / 1e3 / r['step_s']:.0%} | "
                     + " | ".join(f"{r['kernel_ms_per_step'].get(c, 0):.2f}" for c in cats) + " |")
    lines += ["", "Top kernels per variant (ms per step):"]
    for r in rows:
        if "top_kernels_ms" in r:
            lines.append(f"- {r['attention']} {r['precision']} rope_fusion={r['rope_fusion']}: "
                         + "; ".join(f"{k[:70]} {v:.2f}" for k, v in r["top_kernels_ms"][:8]))
    open(os.path.join(a.out, "fp8_profile.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
