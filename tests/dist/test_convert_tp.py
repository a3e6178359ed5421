"""CPU distributed tier (gloo, 4 ranks): TransGQLA across tensor/pipeline layouts.

A Megatron GQA GPT model is built at TP=2 x PP=2 with the weights of a GQA model whose RoPE'd
key content is rank one across heads (lossless under GQLA with d_r = d, freqfold 1, no PCA
truncation; see tests/cpu/test_transgqla.py), and saved by Megatron itself in both formats:
torch_dist (dist_checkpointing.save) and legacy per-rank mp_rank_TT_PPP/model_optim_rng.pt
(the model's own TP/PP shards). Rank 0 converts both with ``gqla-convert gqa-to-gqla`` (a
one-process subprocess). Every rank then builds the Megatron GQLA model at TP=1 and at TP=4,
loads the converted checkpoint with dist_checkpointing.load (Megatron reshards the
layout-independent global tensors) and checks its logits against the reference forward of the
converted weights and against the source's float forward.

    torchrun --standalone --nproc_per_node 4 -m pytest -q -m dist tests/dist/test_convert_tp.py
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402
from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region  # noqa: E402

from gqla_megatron import reference_model as rm  # noqa: E402
from gqla_megatron.conversion import gguf_import as gi  # noqa: E402
from gqla_megatron.conversion import megatron_io as mio  # noqa: E402
from gqla_megatron.testing import (FP32_PARITY, assert_all_ranks, compare, exceeds,  # noqa: E402
                                   init_distributed, load_full_state_dict, model_parallel)

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
pytestmark = [pytest.mark.dist,
              pytest.mark.skipif(WORLD != 4, reason="run under torchrun --nproc_per_node 4")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
D, H, G, HD, F, V, LAYERS, S = 64, 8, 4, 8, 96, 64, 4, 12


def source_model():
    cfg = gi.GQAModelConfig(hidden_size=D, num_layers=LAYERS, num_attention_heads=H, num_kv_heads=G,
                            head_dim=HD, ffn_hidden_size=F, vocab_size=V, rope_base=10000.0, eps=1e-5)
    gen = torch.Generator().manual_seed(11)

    def n(*s, std=0.2):
        return torch.randn(*s, generator=gen) * std

    layers = []
    for _ in range(LAYERS):
        W_K = torch.einsum("jk,skD->jskD", n(G, HD // 2, std=1.0), n(2, HD // 2, D)).reshape(G * HD, D)
        layers.append(gi.GQALayerWeights(
            attn_norm=1 + n(D, std=0.1), W_Q=n(H * HD, D), W_K=W_K, W_V=n(G * HD, D, std=0.06),
            W_O=n(D, H * HD), mlp_norm=1 + n(D, std=0.1), W_fc1=n(2 * F, D), W_fc2=n(D, F)))
    w = gi.GQAModelWeights(embedding=n(V, D, std=1.0), layers=layers, final_norm=1 + n(D, std=0.1),
                           output=n(V, D, std=0.5))
    return w, cfg


def gqa_args(tp, pp):
    return dict(attention="gqa", num_layers=LAYERS, hidden_size=D, ffn_hidden_size=F, num_attention_heads=H,
                num_query_groups=G, qk_head_dim=HD, vocab_size=V, seq_length=64,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, transformer_impl="local")


def save_source_tp2_pp2(root_dist, root_legacy, w, cfg):
    from gqla_megatron.training.models import build_model, transformer_config

    with model_parallel(2, 2):
        common = mio._megatron_common(LAYERS, D, F, H, torch.float32, 1e-5)
        # perform_initialization sets the TP attributes load_full_state_dict slices by
        common.update(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                      perform_initialization=True)
        model = build_model("gqa", transformer_config("gqa", common, dict(num_query_groups=G, qk_head_dim=HD)),
                            vocab_size=V, seq_length=64, backend="local")
        load_full_state_dict(model, mio.gqa_state_dict(w, cfg))
        it = os.path.join(root_dist, "iter_0000002")
        if dist.get_rank() == 0:
            os.makedirs(it)
        dist.barrier()
        dist_checkpointing.save({"model": model.sharded_state_dict()}, it)
        tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        shard = os.path.join(root_legacy, "iter_0000002", f"mp_rank_{tp:02d}_{pp:03d}")
        os.makedirs(shard)
        ns = argparse.Namespace(**gqa_args(2, 2))
        torch.save({"args": ns, "iteration": 2, "checkpoint_version": 3.0, "model": model.state_dict()},
                   os.path.join(shard, "model_optim_rng.pt"))
        dist.barrier()
    if dist.get_rank() == 0:
        for root in (root_dist, root_legacy):
            with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("2")
        with open(os.path.join(it, "gqla_train_state.json"), "w") as f:
            json.dump({"iteration": 2, "args": gqa_args(2, 2)}, f)
    dist.barrier()


def calib_data(prefix):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    gen = np.random.default_rng(1)
    for _ in range(6):
        b.add_document(torch.from_numpy(gen.integers(0, V, 48).astype(np.int32)), [48])
    b.finalize(prefix + ".idx")


def convert(src, out, prefix, target_tp):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    cmd = [sys.executable, os.path.join(ROOT, "convert", "convert_gqla.py"), "gqa-to-gqla", "--load", src,
           "--save", out, "--kv-lora-rank", "none", "--qk-pos-emb-head-dim", str(HD), "--calib-data", prefix,
           "--calib-samples", "8", "--calib-seq-length", "16", "--no-progress",
           "--target-tensor-model-parallel-size", str(target_tp)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def megatron_gqla_logits(ckpt, gcfg, tp, tok):
    from gqla_megatron.megatron import build_gqla_gpt_model

    # the converted model's Megatron config: the source's shape, no latent norms, RoPE base 1e4
    assert (gcfg.hidden_size, gcfg.num_attention_heads) == (D, H) and not gcfg.qk_layernorm
    assert gcfg.megatron_shape() == dict(num_query_groups=G, kv_lora_rank=gcfg.kv_lora_rank, q_lora_rank=None,
                                         qk_head_dim=HD, qk_pos_emb_head_dim=HD, v_head_dim=HD)
    assert gcfg.rotary_base == 10000.0
    with model_parallel(tp, 1):
        config = mio.gqla_megatron_config(gcfg, num_layers=LAYERS, ffn_hidden_size=F, dtype=torch.float32,
                                          eps=1e-5, tensor_model_parallel_size=tp,
                                          perform_initialization=True)
        model = build_gqla_gpt_model(config, vocab_size=V, max_sequence_length=64)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), os.path.join(ckpt, "iter_0000000")))
        with torch.no_grad():
            out = model(tok, torch.arange(tok.shape[1])[None].expand_as(tok), None)
            return gather_from_tensor_model_parallel_region(out)


def test_tp2_pp2_gqa_converts_and_loads_at_tp1_and_tp4():
    init_distributed()
    w, cfg = source_model()
    base = [tempfile.mkdtemp(prefix="gqla_conv_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(base, src=0)
    base = base[0]
    src_dist, src_legacy = os.path.join(base, "gqa_dist"), os.path.join(base, "gqa_legacy")
    save_source_tp2_pp2(src_dist, src_legacy, w, cfg)
    outs = {"torch_dist": os.path.join(base, "gqla_from_dist"), "legacy": os.path.join(base, "gqla_from_legacy")}
    ok, detail = True, ""
    if dist.get_rank() == 0:
        prefix = os.path.join(base, "calib_text_document")
        calib_data(prefix)
        for (name, out), src in zip(outs.items(), (src_dist, src_legacy)):
            r = convert(src, out, prefix, target_tp=4)
            if r.returncode != 0:
                ok, detail = False, f"{name}: {r.stderr[-3000:]}"
    dist.barrier()
    assert_all_ranks(ok, detail)

    tok = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(4))
    src_logits = gi.gqa_forward(tok, w, cfg)
    for name, out in outs.items():
        mw, gcfg, args = mio.read_gqla_checkpoint(out)
        assert args["tensor_model_parallel_size"] == 4
        expected = rm.forward(tok, mw, gcfg)
        r = compare(expected, src_logits)
        assert_all_ranks(not exceeds(r, rel_l2=4 * FP32_PARITY), f"{name}: converted vs source {r}")
        for tp in (1, 4):
            got = megatron_gqla_logits(out, gcfg, tp, tok)
            r = compare(got, expected)
            if dist.get_rank() == 0:
                print(f"{name} -> GQLA at TP{tp}: rel_l2 {r['rel_l2']:.2e} vs reference")
            assert_all_ranks(not exceeds(r, rel_l2=FP32_PARITY), f"{name} TP{tp}: {r}")
    dist.barrier()
