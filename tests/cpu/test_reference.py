"""CPU unit tier: identities of the GQLA math reference, in float64."""

import pytest
import torch

from gqla_megatron.config import GQLAConfig
from gqla_megatron import reference as ref

TOL = 1e-10  # fp64 identities: only summation order differs between the paths


def make(seed=0, **kw):
    base = dict(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_lora_rank=32,
                qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12, q_lora_rank=24)
    base.update(kw)
    cfg = GQLAConfig(**base)
    g = torch.Generator().manual_seed(seed)
    w = ref.GQLAWeights.random(cfg, generator=g)
    w.check(cfg)
    return cfg, w, g


def maxdiff(a, b):
    return (a - b).abs().max().item()


def decode_all(path, x, w, cfg, prefill, step):
    """Prefill `prefill` tokens, then decode the rest `step` tokens at a time."""
    B, S, _ = x.shape
    cache = (ref.empty_latent_cache if path == "absorb" else ref.empty_group_cache)(cfg, B)
    fn = ref.decode_absorb if path == "absorb" else ref.decode_gqa
    outs = []
    y, cache = fn(x[:, :prefill], cache, w, cfg)
    outs.append(y)
    for s in range(prefill, S, step):
        y, cache = fn(x[:, s:s + step], cache, w, cfg)
        outs.append(y)
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("s_q", [1, 2, 3])
def test_both_decode_paths_equal_expanded(q_lora_rank, groups, s_q):
    cfg, w, g = make(num_query_groups=groups, q_lora_rank=q_lora_rank)
    x = torch.randn(2, 11, cfg.hidden_size, generator=g, dtype=torch.float64)
    full = ref.attention_expanded(x, w, cfg)
    for path in ("absorb", "gqa"):
        y, cache = decode_all(path, x, w, cfg, prefill=4, step=s_q)
        assert cache.length == 11
        assert maxdiff(y, full) <= TOL, path


def test_token_by_token_equals_full_forward_and_caches_agree():
    cfg, w, g = make(seed=1)
    x = torch.randn(3, 9, cfg.hidden_size, generator=g, dtype=torch.float64)
    full = ref.attention_expanded(x, w, cfg)
    ya, lat = decode_all("absorb", x, w, cfg, prefill=1, step=1)
    yg, grp = decode_all("gqa", x, w, cfg, prefill=1, step=1)
    assert maxdiff(ya, full) <= TOL and maxdiff(yg, full) <= TOL
    # the GQA cache is exactly the expansion of the latent cache
    exp = ref.expand_cache(lat, w, cfg)
    assert maxdiff(exp.k_nope_BTGN, grp.k_nope_BTGN) <= TOL
    assert maxdiff(exp.v_BTGV, grp.v_BTGV) <= TOL
    assert maxdiff(exp.k_rope_BTR, grp.k_rope_BTR) == 0
    # and compressing it gives the latent back (g(d_n+d_v)=112 >= r=32)
    back = ref.compress_cache(grp, w, cfg)
    assert maxdiff(back.c_BTC, lat.c_BTC) <= 1e-9


def test_cache_sizes():
    cfg = GQLAConfig(hidden_size=4096, num_attention_heads=32, num_query_groups=8, kv_lora_rank=512,
                     qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128)
    assert cfg.absorb_cache_elems_per_token == 576
    assert cfg.absorb_cache_elems_per_token / (2 * 8 * 128) == 0.28125   # paper's 28.125 %
    assert cfg.gqa_cache_elems_per_token() == 2112
    assert cfg.gqa_cache_elems_per_token(rope_per_group=True) == 2560
    canon = GQLAConfig(hidden_size=7168, num_attention_heads=128, num_query_groups=4,
                       kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128)
    assert 2 * canon.gqa_cache_elems_per_token() == 2176                 # Table 2, g = 4


def test_path_switch_mid_generation():
    cfg, w, g = make(seed=2)
    x = torch.randn(2, 10, cfg.hidden_size, generator=g, dtype=torch.float64)
    full = ref.attention_expanded(x, w, cfg)
    # absorb for 6 tokens, switch to gqa by expansion, back to absorb by compression
    y1, lat = ref.decode_absorb(x[:, :6], ref.empty_latent_cache(cfg, 2), w, cfg)
    y2, grp = ref.decode_gqa(x[:, 6:8], ref.expand_cache(lat, w, cfg), w, cfg)
    y3, _ = ref.decode_absorb(x[:, 8:], ref.compress_cache(grp, w, cfg), w, cfg)
    assert maxdiff(torch.cat([y1, y2, y3], 1), full) <= 1e-9


def test_compress_refused_when_rank_deficient():
    cfg, w, _ = make(num_query_groups=1, kv_lora_rank=40, qk_head_dim=16, v_head_dim=12)
    assert not cfg.compress_is_exact
    with pytest.raises(ValueError, match="rank-deficient"):
        ref.latent_pinv(w, cfg)
    # shapes allow it, but the weights do not: identical group blocks -> rank <= N+V = 28 < 32
    cfg2, w2, _ = make(num_query_groups=4, kv_lora_rank=32)
    w2 = ref.GQLAWeights.random(cfg2, generator=torch.Generator().manual_seed(5),
                                distinct_groups=False)
    with pytest.raises(ValueError, match="rank"):
        ref.latent_pinv(w2, cfg2)


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_equals_independent_mla_formula(groups):
    """g = h_q is MLA; any g equals MLA with each group's up-projection repeated per head."""
    cfg, w, g = make(num_query_groups=groups, seed=3)
    x = torch.randn(2, 7, cfg.hidden_size, generator=g, dtype=torch.float64)
    mla = ref.mla_attention_per_head(x, w, ref.mla_layout_up_proj(w, cfg), cfg)
    assert maxdiff(ref.attention_expanded(x, w, cfg), mla) <= TOL


def test_independent_sdpa_check():
    """Expanded form vs torch's own SDPA with enable_gqa (no shared code with the reference)."""
    cfg, w, g = make(seed=4, q_lora_rank=None)
    B, S = 2, 6
    x = torch.randn(B, S, cfg.hidden_size, generator=g, dtype=torch.float64)
    pos = torch.arange(S)
    qn, qr = ref.project_queries(x, w, cfg, pos)
    c, kr = ref.project_latent(x, w, cfg, pos)
    kn, v = ref.expand_latent(c, w, cfg)
    G = cfg.num_query_groups
    q = torch.cat([qn, qr], -1).transpose(1, 2)                                    # B H S X
    k = torch.cat([kn, kr[:, :, None].expand(B, S, G, -1)], -1).transpose(1, 2)    # B G S X
    o = torch.nn.functional.scaled_dot_product_attention(
        q, k, v.transpose(1, 2), is_causal=True, scale=cfg.softmax_scale, enable_gqa=True)
    y = o.transpose(1, 2).reshape(B, S, -1) @ w.W_O.T
    assert maxdiff(ref.attention_expanded(x, w, cfg), y) <= TOL


def test_rope_is_a_rotation_with_relative_scores():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 8, generator=g, dtype=torch.float64)
    s1 = (ref.apply_rope(q, torch.tensor([7]), 1e4) * ref.apply_rope(k, torch.tensor([3]), 1e4)).sum()
    s2 = (ref.apply_rope(q, torch.tensor([14]), 1e4) * ref.apply_rope(k, torch.tensor([10]), 1e4)).sum()
    assert abs(s1 - s2) < 1e-12
    assert abs(ref.apply_rope(q, torch.tensor([5]), 1e4).norm() - q.norm()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rope_equals_the_even_odd_formula_bit_for_bit(dtype):
    """rotate's x * cos2 + pair_swap(x) * sin2 is the textbook pairwise rotation with the same
    roundings (a - b == a + (-b), a + b == b + a): equal bit for bit, for (S,) and (B, S)
    positions, with and without a head dim."""
    g = torch.Generator().manual_seed(1)
    R, base = 16, 5e5
    inv = base ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)
    for x, pos in ((torch.randn(2, 5, 3, R, generator=g), torch.randint(0, 9000, (2, 5), generator=g)),
                   (torch.randn(2, 5, R, generator=g), torch.arange(5))):
        x = x.to(dtype)
        ang = pos.to(torch.float64)[..., None] * inv
        ang = ang if ang.ndim == 3 else ang[None]
        if x.ndim == 4:
            ang = ang[:, :, None, :]
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        want = torch.empty_like(x)
        want[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        want[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        assert torch.equal(ref.apply_rope(x, pos, base), want)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed):
    r = torch.Generator().manual_seed(100 + seed)
    pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=r))]
    G = pick(1, 2, 3)
    cfg, w, g = make(seed=seed, num_attention_heads=G * pick(1, 2, 3), num_query_groups=G,
                     kv_lora_rank=pick(8, 20, 33), qk_head_dim=pick(4, 10), v_head_dim=pick(6, 8),
                     qk_pos_emb_head_dim=pick(2, 6), q_lora_rank=pick(None, 12), hidden_size=pick(24, 40))
    x = torch.randn(pick(1, 3), pick(2, 9), cfg.hidden_size, generator=g, dtype=torch.float64)
    full = ref.attention_expanded(x, w, cfg)
    for path in ("absorb", "gqa"):
        y, _ = decode_all(path, x, w, cfg, prefill=1, step=pick(1, 2))
        assert maxdiff(y, full) <= TOL


def test_weights_shape_check_names_the_tensor():
    cfg, w, _ = make()
    w.W_UKV = w.W_UKV[:-1]
    with pytest.raises(ValueError, match="W_UKV"):
        w.check(cfg)
