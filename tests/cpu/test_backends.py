"""CPU tier: every decode backend that can run here against the reference attention, for
s_q = 1..4 new tokens per sequence and ragged cache lengths (outputs compared in float64)."""

import pytest
import torch

from gqla_megatron import reference as ref
from gqla_megatron.config import GQLAConfig
from gqla_megatron.inference.backends import PRIORITY, REGISTRY, select_backend
from gqla_megatron.testing import FP32_PARITY, assert_close_report

CFG = GQLAConfig(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_lora_rank=32,
                 qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, q_lora_rank=24)
CPU = torch.device("cpu")


def _inputs(cfg, B=3, T=24, S=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = ref.GQLAWeights.random(cfg, generator=g, dtype=dtype)
    H = cfg.num_attention_heads
    q_nope = torch.randn(B, S, H, cfg.qk_head_dim, generator=g, dtype=dtype)
    q_rope = torch.randn(B, S, H, cfg.qk_pos_emb_head_dim, generator=g, dtype=dtype)
    c = torch.randn(B, T, cfg.kv_lora_rank, generator=g, dtype=dtype)
    kr = torch.randn(B, T, cfg.qk_pos_emb_head_dim, generator=g, dtype=dtype)
    lengths = torch.randint(0, T - S + 1, (B,), generator=g)
    return w, q_nope, q_rope, c, kr, lengths


def _expected(w, cfg, q_nope, q_rope, c, kr, lengths):
    """Expanded-form attention through the reference helpers with an explicit per-(b, s) mask."""
    B, S = q_nope.shape[:2]
    T = c.shape[1]
    k_nope, v = ref.expand_latent(c, w, cfg)
    q_pos = lengths[:, None] + torch.arange(S)[None]
    allowed = ref._causal_mask(S, T, q_pos, torch.arange(T))
    return ref._attend_groups(q_nope, q_rope, k_nope, kr, v, allowed, cfg.softmax_scale,
                              cfg.heads_per_group)


def _cache(path, w, cfg, c, kr):
    if path == "absorb":
        return {"c": c, "k_rope": kr}
    k_nope, v = ref.expand_latent(c, w, cfg)
    return {"k_nope": k_nope.contiguous(), "v": v.contiguous(), "k_rope": kr}


CPU_BACKENDS = [n for n, b in REGISTRY.items() if not b.supported(CFG, CPU, torch.float64)]


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("S", [1, 2, 3, 4])
def test_backend_matches_reference_for_sq_1_to_4_ragged(name, S):
    backend = REGISTRY[name]()
    w, q_nope, q_rope, c, kr, lengths = _inputs(CFG, S=S, seed=S)
    got = backend.attend(backend.prepare(w, CFG), q_nope, q_rope, _cache(backend.path, w, CFG, c, kr),
                         lengths, CFG)
    want = _expected(w, CFG, q_nope, q_rope, c, kr, lengths)
    assert got.shape == want.shape
    assert_close_report(f"{name} s_q={S}", got, want, rel_l2=FP32_PARITY)


def test_stock_backends_are_registered_for_both_paths():
    assert set(CPU_BACKENDS) >= {"torch_absorb", "torch_gqa"}
    for path in ("absorb", "gqa"):
        assert select_backend(path, CFG, CPU, torch.float32).backend.path == path
    with pytest.raises(ValueError, match="serves the gqa path"):
        select_backend("absorb", CFG, CPU, torch.float32, requested="torch_gqa")
    with pytest.raises(ValueError, match="unknown decode backend"):
        select_backend("absorb", CFG, CPU, torch.float32, requested="nope")
    assert all(n in REGISTRY for names in PRIORITY.values() for n in names)
