"""Tensor-parallel decode of the GQLA engine on several GPUs of one host (NCCL).

    source .devkit/setup.sh
    for N in 1 2 4; do torchrun --standalone --nproc_per_node $N benchmarks/engine_tp_h200/run.py --out $OUT/tp; done

Without CUDA the same script runs on gloo with a tiny g = 8 model (TP up to 8 on both paths;
CPU times are not GPU figures: this shows the per-rank cache bytes and that every TP runs).

The ~1B model of ../engine_decode_h200 (gqla_1b shapes, h_q 16, g 4, random bf16 weights, the
same on every rank: seeded generator), decode steps at a pre-filled random context
(``fill_random_context``, benchmark only) for each path, TP = world size, CUDA graphs when the
capture works (NCCL all-reduce inside the graph), eager otherwise. Per rank: KV-cache bytes per
token (the gqa path holds g/TP groups plus the replicated RoPE key; the absorb path replicates the
latent), step time, tokens/s. Rank 0 appends one JSON line per cell to <out>/engine_tp.jsonl.
"""

import argparse
import importlib.util
import json
import os

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))


def _engine_bench():
    spec = importlib.util.spec_from_file_location(
        "engine_decode_run", os.path.join(os.path.dirname(HERE), "engine_decode_h200", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    p.add_argument("--context", type=int, default=8192)
    a = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()  # without CUDA: a tiny model on gloo (checks the script only)
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    eb = _engine_bench()
    from gqla_megatron import roofline
    from gqla_megatron.inference.engine import GQLAEngine

    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        mw, cfg, recipe, n_params = eb.model_1b(dev, dtype)
    else:  # CPU (gloo): a tiny model with g = 8 so that TP = 8 runs both paths
        from gqla_megatron.config import GQLAConfig
        from gqla_megatron.testing import random_model_weights

        cfg = GQLAConfig(hidden_size=128, num_attention_heads=16, num_query_groups=8, kv_lora_rank=64,
                         qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, q_lora_rank=None)
        mw = random_model_weights(cfg, vocab=256, layers=2, seed=0)
    table = roofline.get_device("H200")
    for path in ("absorb", "gqa"):
        for batch in a.batch:
            row = {"tp": world, "path": path, "batch": batch, "context": a.context, "device": str(dev.type),
                   "auto_choice": roofline.choose_decode_path(cfg, table, s_q=1, batch=batch, context=a.context,
                                                              dtype_bytes=2, tp=world).path}
            for graphs in (True, False):
                eng = None
                try:
                    eng = GQLAEngine(mw, cfg, decode_path=path, max_batch=batch, max_seq_len=a.context + 64,
                                     device=dev, dtype=dtype, device_spec=table,
                                     tp_group=dist.group.WORLD, cuda_graphs=graphs)
                    r = eb.time_cell(eng, batch, a.context, max_s=1.0)
                    row.update(r, cuda_graphs=eng._graphs is not None, backend=eng.backend.name,
                               kv_bytes_per_token_per_rank=eng.cache_bytes_per_token())
                    break
                except Exception as e:  # noqa: BLE001  (graph capture with NCCL may fail: retry eager)
                    row[f"error_graphs_{graphs}"] = f"{type(e).__name__}: {str(e)[:200]}"
                finally:
                    del eng
                    if cuda:
                        torch.cuda.empty_cache()
            if rank == 0:
                os.makedirs(a.out, exist_ok=True)
                with open(os.path.join(a.out, "engine_tp.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
