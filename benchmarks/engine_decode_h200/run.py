"""End-to-end decode benchmark of the GQLA engine on one GPU (written for the H200).

    python3 benchmarks/engine_decode_h200/run.py --out $OUT/engine_decode

A ~1B GQLA model with the gqla_1b recipe shapes (24 layers, hidden 2048, SwiGLU 5632, h_q 16,
g 4, r 512, d_n = d_v = 128, d_r 64, vocab 49152) and one MTP layer, RANDOM weights, bf16.
For batch {1, 8, 32, 128} x context {1k, 8k, 32k} and both decode paths it times whole decode
steps (all layers, LM head, sampling) of the engine, eager and with CUDA graphs, plain and
MTP-speculative (1 draft, s_q = 2). The context is NOT prefilled: ``fill_random_context`` fills
the caches with random values (benchmark-only engine method), then a few steps are timed, so
the step times are real and the generated tokens meaningless. With random weights the MTP
acceptance is near chance: speculative tokens/s here show the cost of verifying s_q = 2,
not a real speedup (tokens/s = emitted tokens / time, emitted = accepted + 1 per row-step).

Also reported: KV-cache bytes per token of each path against a same-shape GQA model (g KV heads
of head dim d_n), the roofline prediction of each cell (gqla_megatron.roofline, attention only,
times the layer count, plus the weight read time) with the H200 table spec and with a measured
probe, and how often ``auto`` (both specs) picked the path that measured faster.

Cells that do not fit in memory are skipped with the estimate; each cell is time-boxed and the
whole run stops starting cells after --budget-s seconds (default 300: under 6 minutes in all).
Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from gqla_megatron import reference as ref  # noqa: E402
from gqla_megatron import reference_model as refm  # noqa: E402
from gqla_megatron import roofline  # noqa: E402
from gqla_megatron.config import GQLAConfig  # noqa: E402
from gqla_megatron.inference.engine import GQLAEngine  # noqa: E402
from gqla_megatron.training.recipes import get_recipe  # noqa: E402

BATCHES, CONTEXTS = (1, 8, 32, 128), (1024, 8192, 32768)
GiB = 2 ** 30


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free_bytes(dev):
    return torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 64 * GiB


def model_1b(device, dtype, mtp_layers=1, seed=0, smoke=False):
    r = get_recipe("gqla_1b")
    if smoke:  # --cpu-smoke: the same code on a tiny model (checks the script, measures nothing)
        r.update(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, kv_lora_rank=32,
                 qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, vocab_size=128)
    cfg = GQLAConfig(hidden_size=r["hidden_size"], num_attention_heads=r["num_attention_heads"],
                     num_query_groups=r["num_query_groups"], kv_lora_rank=r["kv_lora_rank"],
                     qk_head_dim=r["qk_head_dim"], qk_pos_emb_head_dim=r["qk_pos_emb_head_dim"],
                     v_head_dim=r["v_head_dim"], q_lora_rank=r["q_lora_rank"])
    D, F, V, H = cfg.hidden_size, r["ffn_hidden_size"], r["vocab_size"], cfg.num_attention_heads
    N, R, Vd, C, G = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.num_query_groups
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, dtype=dtype)

    def n(*shape, std=0.02):
        return torch.randn(*shape, generator=g, **kw) * std

    def layer():
        attn = ref.GQLAWeights(W_UQ=n(H * (N + R), D), W_DKV=n(C, D), W_KR=n(R, D), W_UKV=n(G * (N + Vd), C),
                               W_O=n(D, H * Vd, std=0.02 / math.sqrt(2 * r["num_layers"])),
                               kv_norm=torch.ones(C, **kw))
        attn.check(cfg)
        return refm.LayerWeights(torch.ones(D, **kw), attn, torch.ones(D, **kw), n(2 * F, D), n(D, F))

    mw = refm.ModelWeights(n(V, D), [layer() for _ in range(r["num_layers"])], torch.ones(D, **kw), n(V, D),
                           mtp=[refm.MTPWeights(torch.ones(D, **kw), torch.ones(D, **kw), n(D, 2 * D), layer(),
                                                torch.ones(D, **kw)) for _ in range(mtp_layers)])
    n_params = sum(t.numel() for t in [mw.embedding, mw.output] + [p for l in mw.layers for p in
                   (l.W_fc1, l.W_fc2, l.attn.W_UQ, l.attn.W_DKV, l.attn.W_KR, l.attn.W_UKV, l.attn.W_O)])
    return mw, cfg, r, n_params


def kv_bytes_per_token(cfg, layers, e=2):
    gqla_absorb = (cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim) * e * layers
    gqla_gqa = (cfg.num_query_groups * (cfg.qk_head_dim + cfg.v_head_dim) + cfg.qk_pos_emb_head_dim) * e * layers
    gqa_model = 2 * cfg.num_query_groups * cfg.qk_head_dim * e * layers  # g K and V heads of dim d_n, no latent
    return {"absorb": gqla_absorb, "gqa": gqla_gqa, "same_shape_gqa_model": gqa_model}


def need_bytes(cfg, layers, path, batch, capacity, s_q):
    """(total, caches, temporaries) bytes of one cell: the caches of all layers (+1 MTP layer) for
    the full capacity, plus the stock backends' transient fp32 scores/probabilities and a
    per-layer cache-sized copy (einsum layouts), plus 3 GiB for weights and the LM head."""
    per_tok = kv_bytes_per_token(cfg, layers + 1)[path]
    caches = per_tok * batch * capacity
    H = cfg.num_attention_heads
    width = cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim if path == "absorb" else \
        cfg.num_query_groups * (cfg.qk_head_dim + cfg.v_head_dim) + cfg.qk_pos_emb_head_dim
    temps = 4 * batch * H * s_q * capacity * 4 + 2 * batch * capacity * width * 2
    return caches + temps + 3 * GiB, caches, temps


def time_cell(eng, batch, context, *, warmup=2, max_steps=10, max_s=1.5):
    st = eng.fill_random_context(batch, context)
    _sync(eng.device)
    t_first = time.perf_counter()
    for i in range(warmup):  # the first step captures the CUDA graphs when they are on
        eng.bench_step(st)
        if i == 0:
            _sync(eng.device)
            first_s = time.perf_counter() - t_first  # graph capture (+ any kernel compiled mid-serving)
    _sync(eng.device)
    emitted, steps, t0 = 0, 0, time.perf_counter()
    acc = []
    while steps < max_steps and time.perf_counter() - t0 < max_s:
        acc.append(eng.bench_step(st)[:batch])
        steps += 1
    _sync(eng.device)
    dt = time.perf_counter() - t0
    emitted = int(torch.stack(acc).sum())
    return {"steps": steps, "step_s": dt / steps, "tokens_per_s": emitted / dt, "first_step_s": first_s,
            "tokens_per_step_per_row": emitted / (steps * batch)}


def predicted(cfg, spec, path, batch, context, s_q, layers, weight_bytes):
    est = roofline.estimate(cfg, spec, path, s_q=s_q, batch=batch, context=context, dtype_bytes=2)
    attn = est.step_time_s * layers
    weights = weight_bytes / (spec.hbm_tbps * 1e12)
    step = attn + weights
    return {"attention_step_s": attn, "weights_read_s": weights, "step_s": step,
            "tokens_per_s": batch * s_q / step}


MODES = {"plain_eager": ("plain", False, False), "plain_graphs": ("plain", False, True),
         "mtp_graphs": ("mtp_spec", True, True), "mtp_eager": ("mtp_spec", True, False)}


def main(argv=None):
    global BATCHES, CONTEXTS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (results.json, results.md)")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting cells after this many seconds")
    p.add_argument("--max-cell-s", type=float, default=1.5, help="timed seconds per cell (at most)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the script only")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help="which step kinds to time (default: all)")
    p.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "triton", "torch"],
                   help="decode backends, timed side by side: auto (the registry's first choice: on an H200 "
                        "tilelang_absorb / triton_gqa), triton (triton_<path>) and/or torch (the stock "
                        "torch_<path>)")
    p.add_argument("--paths", nargs="+", default=["absorb", "gqa"], choices=["absorb", "gqa"],
                   help="decode paths to time (default both)")
    p.add_argument("--batches", nargs="+", type=int, default=None, help=f"batch sizes (default {BATCHES})")
    p.add_argument("--contexts", nargs="+", type=int, default=None, help=f"context lengths (default {CONTEXTS})")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        BATCHES, CONTEXTS = (1, 4), (64, 128)
    elif not torch.cuda.is_available():
        print("engine_decode_h200: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    BATCHES = tuple(args.batches or BATCHES)
    CONTEXTS = tuple(args.contexts or CONTEXTS)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    mw, cfg, recipe, n_params = model_1b(dev, dtype, smoke=args.cpu_smoke)
    L = recipe["num_layers"]
    table = roofline.get_device("H200")
    probe = roofline.probe_device(dev)  # CUDA: 8192^3 bf16 matmul and a 1 GiB copy
    weight_bytes = 2 * n_params
    kv = kv_bytes_per_token(cfg, L)
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke run)", "model": {"params": n_params, "layers": L, "shape": cfg.to_dict(),
           "recipe": "gqla_1b", "weights": "random, bf16", "mtp_layers": 1},
           "kv_bytes_per_token": kv, "kv_ratio_vs_gqa_model": {k: v / kv["same_shape_gqa_model"] for k, v in kv.items()},
           "probe": {"bf16_tflops": probe.bf16_tflops, "hbm_tbps": probe.hbm_tbps},
           "h200_table": {"bf16_tflops": table.bf16_tflops, "hbm_tbps": table.hbm_tbps}, "cells": []}
    print(f"{out['device']}: {n_params / 1e9:.2f} B params; KV bytes/token {kv}; probe {probe.bf16_tflops:.0f} TFLOP/s "
          f"{probe.hbm_tbps:.2f} TB/s", flush=True)
    modes = [MODES[m] for m in args.modes]
    order = [(m, b, c, be) for m in modes for c in CONTEXTS for b in BATCHES for be in args.backends]
    for (mode, spec_on, graphs), batch, context, backend_family in order:
        s_q = 2 if spec_on else 1
        for path in args.paths:
            cell = {"mode": mode, "cuda_graphs": graphs, "path": path, "batch": batch, "context": context, "s_q": s_q,
                    "backend_request": backend_family}
            out["cells"].append(cell)
            if time.perf_counter() - t_start > args.budget_s:
                cell["skipped"] = f"time budget {args.budget_s:.0f} s spent"
                continue
            capacity = context + 64
            total, caches, temps = need_bytes(cfg, L, path, batch, capacity, s_q)
            free = _free_bytes(dev)
            if total > 0.92 * free:
                cell["skipped"] = (f"does not fit: needs ~{total / GiB:.0f} GiB (caches {caches / GiB:.0f} GiB + "
                                   f"attention temporaries {temps / GiB:.0f} GiB + 3 GiB), {free / GiB:.0f} GiB free")
                continue
            eng = None
            try:
                t_load = time.perf_counter()
                eng = GQLAEngine(mw, cfg, decode_path=path, max_batch=batch, max_seq_len=capacity, device=dev,
                                 dtype=dtype, device_spec=table, speculative=spec_on, cuda_graphs=graphs,
                                 decode_backend="auto" if backend_family == "auto" else f"{backend_family}_{path}")
                cell["backend"] = eng.backend.name
                cell["load_s"] = time.perf_counter() - t_load  # includes kernels compiled at load (warmup)
                cell["compiled_at_load"] = list(eng.warmed)
                cell.update(time_cell(eng, batch, context, max_s=args.max_cell_s))
                if spec_on:
                    cell["acceptance_rate"] = cell["tokens_per_step_per_row"] - 1.0
            except torch.cuda.OutOfMemoryError as e:
                cell["skipped"] = f"out of memory: {str(e).splitlines()[0][:160]}"
            finally:
                del eng
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            for name, sp in (("h200_table", table), ("probe", probe)):
                cell[f"predicted_{name}"] = predicted(cfg, sp, path, batch, context, s_q, L, weight_bytes)
            if "tokens_per_s" in cell:
                print(f"{mode:8s} graphs={int(graphs)} {path:6s} B={batch:3d} ctx={context:5d}: "
                      f"{cell['tokens_per_s']:10.0f} tok/s, step {cell['step_s'] * 1e3:7.2f} ms "
                      f"(pred {cell['predicted_h200_table']['step_s'] * 1e3:6.2f} ms) {cell['backend']}; load {cell['load_s']:.1f} s, first step {cell['first_step_s']:.2f} s"
                      + (f", compiled at load: {'; '.join(cell['compiled_at_load'])}" if cell["compiled_at_load"] else ""),
                      flush=True)
            else:
                print(f"{mode:8s} graphs={int(graphs)} {path:6s} B={batch:3d} ctx={context:5d}: skipped: {cell['skipped']}",
                      flush=True)
    # auto vs measured
    picks = {"h200_table": [0, 0], "probe": [0, 0]}
    for (mode, spec_on, graphs), be in [(m, be) for m in modes for be in args.backends]:
        for b in BATCHES:
            for c in CONTEXTS:
                pair = {x["path"]: x for x in out["cells"] if x["mode"] == mode and x["cuda_graphs"] == graphs
                        and x["batch"] == b and x["context"] == c and x["backend_request"] == be
                        and "tokens_per_s" in x}
                if len(pair) < 2:
                    continue
                faster = max(pair, key=lambda k: pair[k]["tokens_per_s"])
                for name, sp in (("h200_table", table), ("probe", probe)):
                    auto = roofline.choose_decode_path(cfg, sp, s_q=2 if spec_on else 1, batch=b, context=c,
                                                       dtype_bytes=2).path
                    for x in pair.values():
                        x[f"auto_{name}"] = auto
                        x["measured_faster"] = faster
                    picks[name][0] += auto == faster
                    picks[name][1] += 1
    out["auto_picked_faster"] = {k: {"right": v[0], "cells": v[1]} for k, v in picks.items()}
    out["wall_s"] = time.perf_counter() - t_start
    write(out, args.out)
    print(f"auto picked the faster path: {out['auto_picked_faster']}; {out['wall_s']:.0f} s")
    return 0


def write(out, folder):
    tmp = os.path.join(folder, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, os.path.join(folder, "results.json"))
    kv = out["kv_bytes_per_token"]
    lines = [f"# GQLA engine decode on {out['device']}", "",
             f"Model: gqla_1b shapes, {out['model']['params'] / 1e9:.2f} B params, random bf16 weights, 1 MTP layer. "
             f"Measured probe: {out['probe']['bf16_tflops']:.0f} TFLOP/s, {out['probe']['hbm_tbps']:.2f} TB/s.", "",
             f"KV bytes per token (all {out['model']['layers']} layers, bf16): " + ", ".join(
                 f"{k} {v:,} ({out['kv_ratio_vs_gqa_model'][k]:.3f} of the GQA model)" for k, v in kv.items()), "",
             "Predicted = roofline attention time x layers + weight read time (H200 table spec). "
             "Speculative rows: random weights, so acceptance is near chance (see `acc`).", "",
             "| mode | graphs | path | batch | context | tok/s | step ms | predicted ms | pred. (probe) ms | acc | auto (table / probe) | faster | backend |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in out["cells"]:
        if "tokens_per_s" not in c:
            lines.append(f"| {c['mode']} | {int(c['cuda_graphs'])} | {c['path']} | {c['batch']} | {c['context']} | "
                         f"skipped: {c['skipped']} | | | | | | | |")
            continue
        lines.append(
            f"| {c['mode']} | {int(c['cuda_graphs'])} | {c['path']} | {c['batch']} | {c['context']} | "
            f"{c['tokens_per_s']:,.0f} | {c['step_s'] * 1e3:.2f} | {c['predicted_h200_table']['step_s'] * 1e3:.2f} | "
            f"{c['predicted_probe']['step_s'] * 1e3:.2f} | {c.get('acceptance_rate', float('nan')):.3f} | "
            f"{c.get('auto_h200_table', '-')} / {c.get('auto_probe', '-')} | {c.get('measured_faster', '-')} | {c['backend']} |")
    a = out["auto_picked_faster"]
    lines += ["", f"`auto` picked the measured-faster path in {a['h200_table']['right']}/{a['h200_table']['cells']} "
              f"cells with the H200 table spec and {a['probe']['right']}/{a['probe']['cells']} with the probe.",
              f"Wall time {out['wall_s']:.0f} s."]
    tmp = os.path.join(folder, "results.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(folder, "results.md"))


if __name__ == "__main__":
    sys.exit(main())
