"""Multi-GPU tier (TE spec, NCCL): TP=2 with and without sequence parallel against TP=1 on the
same weights, fp32, logits and every gradient. This covers the TE branch of the RoPE-key
gradient fix (replicated down-projections), which the CPU tier cannot build.

    source .devkit/setup.sh && torchrun --standalone --nproc_per_node 2 -m pytest -q -m multigpu tests/multigpu
"""

import os

import pytest
import torch

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
pytestmark = [pytest.mark.multigpu,
              pytest.mark.skipif(WORLD != 2 or torch.cuda.device_count() < 2,
                                 reason="needs 2 GPUs under torchrun --nproc_per_node 2")]

megatron = pytest.importorskip("megatron.core")

from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region  # noqa: E402

from gqla_megatron.megatron import build_gqla_gpt_model, tiny_config  # noqa: E402
from gqla_megatron.testing import (  # noqa: E402
    assert_all_ranks, compare, exceeds, full_state_dict, grad_errors, load_full_state_dict,
    model_parallel)

VOCAB, SEQ, BATCH = 256, 32, 2
# fp32 with TF32 off everywhere (NVIDIA_TF32_OVERRIDE=0: TE's cuBLAS GEMMs ignore torch's
# allow_tf32 flag); same limits as the CPU fp32 tier.
LIMITS = dict(rel_l2=2e-6, rel=5e-6)
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")


@pytest.fixture(autouse=True)
def _device():
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def make(tp, sp, seed):
    cfg = tiny_config(hidden_size=128, ffn_hidden_size=256, num_attention_heads=8, num_query_groups=4,
                      kv_lora_rank=64, q_lora_rank=64, qk_head_dim=32, qk_pos_emb_head_dim=32,
                      v_head_dim=32, num_layers=2, tensor_model_parallel_size=tp, sequence_parallel=sp)
    torch.manual_seed(seed)
    return build_gqla_gpt_model(cfg, vocab_size=VOCAB, max_sequence_length=64, backend="te").cuda()


def step(model):
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).cuda()
    pos = torch.arange(SEQ, device="cuda")[None].expand(BATCH, SEQ)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tok, pos, None))
    model(tok, pos, None, labels=torch.roll(tok, -1, 1)).mean().backward()
    return logits


@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_te_tp2_matches_tp1(sp):
    with model_parallel(1, 1):
        base = make(1, False, seed=1)
        full = full_state_dict(base)
        ref_logits = step(base)
        ref_grads = {n: p.grad.detach().clone() for n, p in base.named_parameters()}
    with model_parallel(2, 1):
        model = make(2, sp, seed=2)
        load_full_state_dict(model, full)
        logits = step(model)
        r = compare(logits, ref_logits)
        errs = grad_errors(model, ref_grads, sequence_parallel=sp)
        bad = {k: v for k, v in errs.items() if exceeds(v, **LIMITS)}
        if exceeds(r, **LIMITS):
            bad["logits"] = r
        print(f"TP2 sp={sp}: logits rel_l2 {r['rel_l2']:.2e}, worst grad rel_l2 "
              f"{max(v['rel_l2'] for v in errs.values()):.2e} over {len(errs)} parameters")
        assert_all_ranks(not bad, bad)


def test_te_tp2_without_rope_grad_fix_is_wrong(monkeypatch):
    """Negative control: with the RoPE-key TP reduction removed, the TE spec's replicated
    down-projection reproduces upstream NVIDIA/Megatron-LM#1699 (wrong kv_down / norm grads)."""
    from gqla_megatron.megatron import layer as layer_mod

    monkeypatch.setattr(layer_mod, "copy_to_tensor_model_parallel_region", lambda x, group=None: x)
    with model_parallel(1, 1):
        base = make(1, False, seed=1)
        full = full_state_dict(base)
        step(base)
        ref_grads = {n: p.grad.detach().clone() for n, p in base.named_parameters()}
    with model_parallel(2, 1):
        model = make(2, False, seed=2)
        load_full_state_dict(model, full)
        step(model)
        errs = grad_errors(model, ref_grads, sequence_parallel=False)
    bad = sorted(k for k, v in errs.items() if exceeds(v, **LIMITS))
    print("without the fix, wrong gradients:", bad)
    assert any("linear_kv_down_proj" in k for k in bad), bad
