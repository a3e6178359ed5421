"""GPU tier (one CUDA GPU): the decode engine with CUDA graphs gives the tokens and logits of the
eager engine, on both paths, plain and MTP-speculative, for a ragged batch padded to its graph
bucket, across two generate calls (graph replay on reused caches) and a bucket change.

    python3 -m pytest -q -m gpu tests/gpu/test_engine_cuda_graphs.py
"""

import pytest
import torch

from gqla_megatron.config import GQLAConfig
from gqla_megatron.inference.engine import GQLAEngine, SamplingParams
from gqla_megatron.roofline import get_device
from gqla_megatron.testing import random_model_weights, with_random_mtp

pytestmark = pytest.mark.gpu

CFG = GQLAConfig(hidden_size=128, num_attention_heads=8, num_query_groups=4, kv_lora_rank=64,
                 qk_head_dim=32, qk_pos_emb_head_dim=16, v_head_dim=32, q_lora_rank=48)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9], [4, 2, 3, 1], [3, 3], [8, 1, 8]]
H200 = get_device("H200")


def model():
    return with_random_mtp(random_model_weights(CFG, vocab=200, layers=2, seed=0), CFG, depths=2, seed=1)


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("path", ["absorb", "gqa"])
def test_cuda_graphs_match_eager(path, speculative):
    torch.backends.cuda.matmul.allow_tf32 = False
    mw = model()
    kw = dict(decode_path=path, max_batch=8, max_seq_len=96, device="cuda", device_spec=H200, speculative=speculative)
    eager = GQLAEngine(mw, CFG, **kw)
    graphed = GQLAEngine(mw, CFG, cuda_graphs=True, **kw)
    assert graphed.cuda_graphs and graphed._graphs.capture
    params = SamplingParams(max_new_tokens=24)
    for prompts in (PROMPTS, PROMPTS, PROMPTS[:2]):  # capture, replay on reused caches, new bucket
        want, got = eager.generate(prompts, params), graphed.generate(prompts, params)
        for a, b in zip(got, want):
            assert a.tokens == b.tokens
            assert (a.logits - b.logits).abs().max().item() <= 1e-4
    assert graphed._cache_rows == 2 and graphed._graphs.entries
    if speculative:
        assert graphed.stats["drafted"] > 0 and graphed.stats == eager.stats
