"""GPU tier (one CUDA GPU): after the engine's load-time warm-up no decode step compiles a Triton
kernel -- every batch 1 .. max_batch eagerly and every CUDA-graph bucket, plain (s_q 1) and
MTP-speculative (k = 2: s_q 3 for the main model and MTP depth 1, 4 for depth 2), on
triton_absorb, triton_gqa and (Hopper with tilelang installed) tilelang_absorb, whose Triton
fallback serves the calls ``prefers`` leaves to it.

Measured by the number of compiled variants in the decode kernels' Triton caches (one entry per
variant: ``JITFunction.device_caches[device][0]``, Triton 3.6), emptied before the engine loads
so variants compiled by earlier tests cannot hide one the warm-up missed.

    python3 -m pytest -q -m gpu tests/gpu/test_decode_warmup_gpu.py
"""

import pytest
import torch

from gqla_megatron.config import GQLAConfig
from gqla_megatron.inference.backends import REGISTRY
from gqla_megatron.inference.engine import GQLAEngine, SamplingParams
from gqla_megatron.roofline import get_device
from gqla_megatron.testing import random_model_weights, with_random_mtp

pytestmark = pytest.mark.gpu

# the TileLang kernel's widths (r 512, d_r 64); 16 heads. For tilelang_absorb the test sets
# tilelang_decode.MIN_TOKENS to 32768 (the session-6 rule) so one engine mixes both kernels: at
# s_q 3-4 (48-64 rows) TileLang serves B x 4102 cached tokens >= 32768, i.e. batch 8, and the
# Triton fallback every smaller batch (with the shipped rule TileLang would serve them all)
CFG = GQLAConfig(hidden_size=256, num_attention_heads=16, num_query_groups=4, kv_lora_rank=512,
                 qk_head_dim=64, qk_pos_emb_head_dim=64, v_head_dim=64, q_lora_rank=96)
MAX_BATCH, MAX_SEQ_LEN = 8, 4096
H200 = get_device("H200")


def model():
    return with_random_mtp(random_model_weights(CFG, vocab=200, layers=2, seed=0), CFG, depths=2, seed=1)


def _caches():
    from gqla_megatron.kernels import triton_decode as td

    for k in (td._absorb_partial, td._gqa_partial, td._combine):
        jit = k._jit.get(False)
        if jit is not None:
            for entry in jit.device_caches.values():
                yield entry[0]


def compiled() -> int:
    """Triton kernel variants compiled so far for the decode kernels (all devices)."""
    return sum(len(c) for c in _caches())


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("backend", ["triton_absorb", "triton_gqa", "tilelang_absorb"])
def test_no_triton_compile_after_load(backend, k, cuda_graphs, monkeypatch):
    from gqla_megatron.kernels import tilelang_decode as tld

    monkeypatch.setattr(tld, "MIN_TOKENS", 32768)   # see CFG: both kernels in one engine
    cls = REGISTRY[backend]
    problems = cls.supported(CFG, torch.device("cuda"), torch.bfloat16)
    if problems:
        pytest.skip(f"{backend} cannot run here: {'; '.join(problems)}")
    for c in _caches():
        c.clear()    # recompiles (from Triton's disk cache) whatever the warm-up asks for
    eng = GQLAEngine(model(), CFG, decode_path=cls.path, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN,
                     device="cuda", dtype=torch.bfloat16, device_spec=H200, decode_backend=backend,
                     speculative=k > 0, num_speculative_tokens=k or None, cuda_graphs=cuda_graphs)
    assert eng.backend.name == backend and eng.cuda_graphs == cuda_graphs
    assert any(w.startswith(f"triton {cls.path} kernels") for w in eng.warmed), eng.warmed
    at_load = compiled()
    assert at_load > 0
    params = SamplingParams(max_new_tokens=4, return_logits=False)
    for B in range(1, MAX_BATCH + 1):
        res = eng.generate([[1 + b, 2, 3 + b] for b in range(B)], params)
        assert all(r.error is None and len(r.tokens) == 4 for r in res)
        assert compiled() == at_load, f"batch {B}: a decode step compiled a Triton kernel"
    torch.cuda.synchronize()


@pytest.mark.parametrize("first,then", [("absorb", "gqa"), ("gqa", "absorb")])
def test_no_triton_compile_after_switch_path(first, then, monkeypatch):
    """A path switch mid-generation warms the new path's backend (the engine's choice on this
    GPU), and the decode steps after it, on the converted caches, compile nothing."""
    for c in _caches():
        c.clear()
    marks = []
    set_path = GQLAEngine._set_path

    def recording(self, path):
        set_path(self, path)
        marks.append((path, compiled()))

    monkeypatch.setattr(GQLAEngine, "_set_path", recording)
    eng = GQLAEngine(model(), CFG, decode_path=first, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN,
                     device="cuda", dtype=torch.bfloat16, device_spec=H200)
    res = eng.generate([[1, 2, 3], [4, 5, 6, 7]], SamplingParams(max_new_tokens=6, return_logits=False),
                       switch_at=2, switch_to=then)
    assert all(r.error is None and len(r.tokens) == 6 for r in res)
    assert eng.path == then and [p for p, _ in marks] == [first, then], marks
    assert compiled() == marks[-1][1], f"a decode step after the switch to {then} compiled a Triton kernel"
