"""Time ``gqla-convert gqa-to-gqla`` on a random-weight LLaMA-3-8B-shape Megatron GQA checkpoint.

Shape (``--shape 8b``): 32 layers, D 4096, 32 heads, 8 KV heads, head dim 128, SwiGLU 14336,
vocab 128256, bf16. The source checkpoint is written directly with torch.distributed.checkpoint
(no Megatron model is built): per-layer keys ``decoder.layers.<i>.*`` (one DCP chunk per layer
tensor, as Megatron's torch_dist stores layers), TE norm names, and gqla-pretrain's
``gqla_train_state.json`` args (attention gqa). Weights: normal(0, 0.02), norms 1; generated on
the GPU when there is one. Calibration: a Megatron indexed dataset of random tokens.

Then the conversion runs as a separate process (its peak RSS is the child's ru_maxrss; the CUDA
peak comes from its report), with r = 512, d_r = 64, freqfold 2 (the paper's 28.125 % cache
budget for LLaMA-3-8B), calibration 32 x 512 tokens, covariances/PCA on ``--device``.

One H200 (the lead's command; < 9 minutes including the checkpoint generation):
    python benchmarks/conversion_8b_h200/bench_convert_8b.py --device cuda --results $OUT
CPU smoke run of the same script on a tiny shape:
    python benchmarks/conversion_8b_h200/bench_convert_8b.py --shape tiny --device cpu

Writes ``<results>/conversion_8b.json`` and ``.md`` (timings, peak memory, the converter's
report) and prints them.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = {
    "8b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8, qk_head_dim=128,
               ffn_hidden_size=14336, vocab_size=128256, rank=512, rope_dim=64, freqfold=2),
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=8, num_query_groups=2, qk_head_dim=16,
                 ffn_hidden_size=256, vocab_size=512, rank=32, rope_dim=8, freqfold=2),
}


def write_random_gqa(root: str, s: dict, device: str, dtype=torch.bfloat16) -> float:
    """Random GQA checkpoint in gqla-pretrain's torch_dist layout; returns seconds."""
    import torch.distributed.checkpoint as dcp

    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    D, H, g, d, F, V = (s["hidden_size"], s["num_attention_heads"], s["num_query_groups"], s["qk_head_dim"],
                        s["ffn_hidden_size"], s["vocab_size"])

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()

    sd = {"embedding.word_embeddings.weight": rnd(V, D), "output_layer.weight": rnd(V, D),
          "decoder.final_layernorm.weight": torch.ones(D, dtype=dtype)}
    for l in range(s["num_layers"]):
        p = f"decoder.layers.{l}."
        sd[p + "self_attention.linear_qkv.layer_norm_weight"] = torch.ones(D, dtype=dtype)
        sd[p + "self_attention.linear_qkv.weight"] = rnd((H + 2 * g) * d, D)
        sd[p + "self_attention.linear_proj.weight"] = rnd(D, H * d)
        sd[p + "mlp.linear_fc1.layer_norm_weight"] = torch.ones(D, dtype=dtype)
        sd[p + "mlp.linear_fc1.weight"] = rnd(2 * F, D)
        sd[p + "mlp.linear_fc2.weight"] = rnd(D, F)
    it = os.path.join(root, "iter_0000001")
    os.makedirs(it)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(it, thread_count=8), no_dist=True)
    args = dict(attention="gqa", num_layers=s["num_layers"], hidden_size=D, ffn_hidden_size=F,
                num_attention_heads=H, num_query_groups=g, qk_head_dim=d, vocab_size=V, seq_length=8192,
                rotary_base=500000.0, tensor_model_parallel_size=1, pipeline_model_parallel_size=1, bf16=True)
    with open(os.path.join(it, "gqla_train_state.json"), "w") as f:
        json.dump({"iteration": 1, "args": args}, f)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
    return time.perf_counter() - t0


def write_calib(prefix: str, vocab: int, tokens: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(max(1, tokens // 2048)):
        b.add_document(torch.from_numpy(rng.integers(0, vocab, 2048).astype(np.int32)), [2048])
    b.finalize(prefix + ".idx")


def dir_bytes(p: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work-dir", default=None, help="where the checkpoints go (default: a temp dir, removed)")
    ap.add_argument("--results", default=os.environ.get("OUT") or os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-length", type=int, default=512)
    a = ap.parse_args(argv)
    s = SHAPES[a.shape]
    work = a.work_dir or tempfile.mkdtemp(prefix="gqla_conv8b_")
    src, out, prefix = os.path.join(work, "gqa"), os.path.join(work, "gqla"), os.path.join(work, "calib_text_document")
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        t_gen = write_random_gqa(src, s, gen_device)
        write_calib(prefix, s["vocab_size"], a.calib_samples * a.calib_seq_length * 2)
        print(f"source written in {t_gen:.1f} s ({dir_bytes(src) / 2**30:.2f} GiB)", flush=True)
        cmd = [sys.executable, os.path.join(ROOT, "convert", "convert_gqla.py"), "gqa-to-gqla", "--load", src,
               "--save", out, "--kv-lora-rank", str(s["rank"]), "--qk-pos-emb-head-dim", str(s["rope_dim"]),
               "--freqfold", str(s["freqfold"]), "--calib-data", prefix, "--calib-samples", str(a.calib_samples),
               "--calib-seq-length", str(a.calib_seq_length), "--device", a.device, "--dtype", "bf16",
               "--target-tensor-model-parallel-size", "8" if a.shape == "8b" else "1", "--no-progress"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if r.returncode != 0:
            print(r.stdout[-5000:], r.stderr[-5000:])
            return 1
        rep = json.load(open(os.path.join(out, "conversion_report.json")))
        res = {"shape": a.shape, **{k: v for k, v in s.items()}, "device": a.device,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "torch": torch.__version__, "source_gib": round(dir_bytes(src) / 2**30, 2),
               "output_gib": round(dir_bytes(out) / 2**30, 2), "generate_source_s": round(t_gen, 1),
               "convert_wall_s": round(wall, 1), "convert_peak_rss_mib_child": round(child_rss),
               "report_time_s": rep["time_s"], "report_peak_rss_mib": rep["peak_rss_mib"],
               "cuda_max_allocated_mib": rep.get("cuda_max_allocated_mib"),
               "kv_energy_mean": sum(l["kv_energy"] for l in rep["layers"]) / len(rep["layers"]),
               "rope_energy_mean": sum(l["rope_energy"] for l in rep["layers"]) / len(rep["layers"]),
               "stdout": r.stdout.strip()[-500:]}
        os.makedirs(a.results, exist_ok=True)
        name = "conversion_8b" if a.shape == "8b" else f"conversion_{a.shape}"
        with open(os.path.join(a.results, name + ".json"), "w") as f:
            json.dump(res, f, indent=1)
        md = [f"# gqla-convert gqa-to-gqla, {a.shape} shape, device {a.device} ({res['gpu']})", "",
              "| step | value |", "|---|---|"]
        md += [f"| {k} | {v} |" for k, v in res.items() if k != "stdout"]
        with open(os.path.join(a.results, name + ".md"), "w") as f:
            f.write("\n".join(md) + "\n")
        print(json.dumps(res, indent=1))
        return 0
    finally:
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
