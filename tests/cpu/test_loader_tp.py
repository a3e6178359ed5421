"""CPU tier: gqla-serve's checkpoint loader reads checkpoints saved at TP=2 and PP=2 (torchrun,
2 gloo ranks) exactly as the TP=1 save of the same layout-invariant initialisation, MTP included.

The runs save at iteration 1 with --lr-warmup-iters 1, i.e. after one step at learning rate 0, so
every layout holds the same initial weights; a wrong un-sharding (e.g. the SwiGLU fc1 read as
per-rank [gate ; up] blocks, or the latent/RoPE rows of linear_kv_down_proj interleaved by rank)
permutes rows and fails the exact comparison."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")

from gqla_megatron.inference.loader import load_megatron_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "pretrain", "pretrain_gqla.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
BASE = ["--recipe", "tiny_cpu", "--mock-data", "--train-iters", "2", "--lr-warmup-iters", "1",
        "--exit-interval", "1", "--save-interval", "1", "--init-layout-invariant"]


def _env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, WANDB_MODE="offline")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def save(tmp_path, name, extra, nproc=1):
    out = tmp_path / name
    cmd = ([sys.executable, SCRIPT] if nproc == 1 else [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), SCRIPT])
    r = subprocess.run(cmd + BASE + extra + ["--save", str(out)], capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return str(out)


def flat(mw):
    out = {"embedding": mw.embedding, "final_norm": mw.final_norm, "output": mw.output}
    for prefix, layers in (("layer", mw.layers), ("mtp", [m.layer for m in mw.mtp])):
        for i, lw in enumerate(layers):
            out.update({f"{prefix}{i}.input_norm": lw.input_norm, f"{prefix}{i}.mlp_norm": lw.mlp_norm,
                        f"{prefix}{i}.W_fc1": lw.W_fc1, f"{prefix}{i}.W_fc2": lw.W_fc2})
            for k, v in vars(lw.attn).items():
                if v is not None:
                    out[f"{prefix}{i}.{k}"] = v
    for i, m in enumerate(mw.mtp):
        out.update({f"mtp{i}.enorm": m.enorm, f"mtp{i}.hnorm": m.hnorm, f"mtp{i}.eh_proj": m.eh_proj,
                    f"mtp{i}.final_norm": m.final_norm})
    return out


def assert_same(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


def test_tp2_and_pp2_checkpoints_load_as_tp1(tmp_path):
    tp1, _, _ = load_megatron_checkpoint(save(tmp_path, "tp1", ["--mtp-num-layers", "1"]))
    assert len(tp1.mtp) == 1
    tp2, cfg, args = load_megatron_checkpoint(save(tmp_path, "tp2", ["--mtp-num-layers", "1",
                                                                    "--tensor-model-parallel-size", "2"], nproc=2))
    assert args["tensor_model_parallel_size"] == 2
    assert_same(tp1, tp2)
    # PP=2 with MTP (the MTP block lives on the last stage; saving it needs Megatron's DP/CP-group
    # metadata, see training/checkpoint._model_sharded_state_dict)
    pp2, _, _ = load_megatron_checkpoint(save(tmp_path, "pp2", ["--mtp-num-layers", "1",
                                                                "--pipeline-model-parallel-size", "2"], nproc=2))
    assert len(pp2.mtp) == 1
    assert_same(tp1, pp2)
    # the fc1 rows really are [gate ; up] of the full width: a per-rank block order differs
    W = tp2.layers[0].W_fc1
    F = W.shape[0] // 2
    blocks = torch.cat([W[:F // 2], W[F:F + F // 2], W[F // 2:F], W[F + F // 2:]])
    assert not torch.equal(blocks, tp1.layers[0].W_fc1)
