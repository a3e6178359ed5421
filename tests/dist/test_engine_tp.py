"""CPU distributed tier (gloo, 8 ranks): tensor-parallel decoding gives the TP=1 tokens.

    torchrun --standalone --nproc_per_node 8 -m pytest -m dist tests/dist/test_engine_tp.py

Every rank builds the same tiny model; for TP in {2, 4, 8} the world is cut into groups of TP
ranks and each group decodes the same ragged batch on both paths.
"""

import os

import pytest
import torch.distributed as dist

from gqla_megatron.config import GQLAConfig
from gqla_megatron.inference.engine import GQLAEngine, SamplingParams
from gqla_megatron.roofline import get_device
from gqla_megatron.testing import random_model_weights

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
pytestmark = [pytest.mark.dist, pytest.mark.skipif(WORLD != 8, reason="run under torchrun --nproc_per_node 8")]

H100 = get_device("H100")
PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]


def model(cfg, seed=0, vocab=64):
    return random_model_weights(cfg, vocab=vocab, seed=seed)


@pytest.fixture(scope="module", autouse=True)
def pg():
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    yield


def groups_of(tp):
    """All ranks create all groups (collective); return this rank's."""
    mine = None
    for start in range(0, WORLD, tp):
        g = dist.new_group(list(range(start, start + tp)))
        if start <= dist.get_rank() < start + tp:
            mine = g
    return mine


CFG8 = GQLAConfig(hidden_size=64, num_attention_heads=16, num_query_groups=8, kv_lora_rank=32,
                  qk_head_dim=8, qk_pos_emb_head_dim=8, v_head_dim=8, q_lora_rank=24)


@pytest.mark.parametrize("path", ["absorb", "gqa"])
def test_tp_1_2_4_8_give_identical_tokens(path):
    mw = model(CFG8)
    params = SamplingParams(max_new_tokens=24)
    base = GQLAEngine(mw, CFG8, decode_path=path, max_batch=3, max_seq_len=48, device_spec=H100).generate(PROMPTS, params)
    for tp in (2, 4, 8):
        eng = GQLAEngine(mw, CFG8, decode_path=path, max_batch=3, max_seq_len=48, device_spec=H100,
                         tp_group=groups_of(tp))
        got = eng.generate(PROMPTS, params)
        assert [r.tokens for r in got] == [r.tokens for r in base], (path, tp)
        for a, b in zip(got, base):
            assert (a.logits - b.logits).abs().max() <= 1e-5
        if path == "gqa":  # zero redundancy: this rank caches g/TP groups' K/V plus the RoPE key once
            assert eng.cfg.num_query_groups == CFG8.num_query_groups // tp
            full = 2 * (CFG8.num_query_groups * 16 + 8) * 4  # 2 layers, fp32
            assert eng.cache_bytes_per_token() == 2 * ((CFG8.num_query_groups // tp) * 16 + 8) * 4 < full
        else:  # the latent is replicated on every rank
            assert eng.cache_bytes_per_token() == 2 * (32 + 8) * 4


def test_gqa_path_refused_when_tp_does_not_divide_groups_absorb_still_runs():
    cfg = GQLAConfig(**{**CFG8.to_dict(), "num_query_groups": 4})
    mw = model(cfg, seed=1)
    with pytest.raises(ValueError, match="gqa"):
        GQLAEngine(mw, cfg, decode_path="gqa", max_batch=3, max_seq_len=48, device_spec=H100, tp_group=groups_of(8))
    eng = GQLAEngine(mw, cfg, decode_path="auto", max_batch=3, max_seq_len=48, device_spec=H100, tp_group=groups_of(8))
    assert eng.path == "absorb" and "gqa" in eng.decision.reasons
    base = GQLAEngine(mw, cfg, decode_path="absorb", max_batch=3, max_seq_len=48, device_spec=H100)
    params = SamplingParams(max_new_tokens=12)
    assert [r.tokens for r in eng.generate(PROMPTS, params)] == [r.tokens for r in base.generate(PROMPTS, params)]
