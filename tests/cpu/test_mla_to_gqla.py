"""CPU tier: MLA -> GQLA (per-group PCA of the stacked per-head K/V, absorbed into the query and
output projections; neighbour / similarity grouping; optional Hessian weighting).

Sources are synthetic DeepSeek-style MLA models (one K/V up-projection per head, latent and q
RMSNorms, a q latent) in float64; the source reference is ``reference.mla_attention_per_head`` /
``reference_model.forward`` with ``num_query_groups = num_attention_heads``."""

import dataclasses

import pytest
import torch

from gqla_megatron import reference as ref
from gqla_megatron import reference_model as rm
from gqla_megatron.config import GQLAConfig
from gqla_megatron.conversion import mla_to_gqla as m2g

F64 = torch.float64


def mla_cfg(**over):
    kw = dict(hidden_size=32, num_attention_heads=8, num_query_groups=8, kv_lora_rank=24,
              qk_head_dim=4, qk_pos_emb_head_dim=4, v_head_dim=4, q_lora_rank=12,
              rotary_base=100.0, layernorm_epsilon=1e-6, qk_layernorm=True)
    kw.update(over)
    return GQLAConfig(**kw)


def mla_model(cfg, *, layers=2, vocab=60, seed=0, planted=None):
    """Random float64 MLA model. ``planted``: list of head groups; heads of one group get
    up-projections M_h B_group (same K/V row space per group, rank N resp. V)."""
    gen = torch.Generator().manual_seed(seed)
    D, H, N, V, C = (cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim,
                     cfg.kv_lora_rank)

    def n(*s, std=1.0):
        return torch.randn(*s, generator=gen, dtype=F64) * std

    lws = []
    for _ in range(layers):
        a = ref.GQLAWeights.random(cfg, generator=gen, dtype=F64, std=0.1)
        if planted is not None:
            W = torch.zeros(H, N + V, C, dtype=F64)
            for grp in planted:
                BK, BV = n(N, C, std=0.3), n(V, C, std=0.3)
                for h in grp:
                    W[h, :N] = n(N, N) @ BK
                    W[h, N:] = n(V, V) @ BV
            a.W_UKV = W.reshape(H * (N + V), C)
        lws.append(rm.LayerWeights(1 + n(D, std=0.1), a, 1 + n(D, std=0.1), n(4 * D, D, std=0.1),
                                   n(D, 2 * D, std=0.1)))
    emb = n(vocab, D)
    return rm.ModelWeights(embedding=emb, layers=lws, final_norm=1 + n(D, std=0.1),
                           output=n(vocab, D, std=0.3), eps=1e-5)


def tokens(cfg, n=6, S=16, seed=1, vocab=60):
    return torch.randint(0, vocab, (n, S), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def rand_x(cfg, S=16, B=2, seed=3):
    return torch.randn(B, S, cfg.hidden_size, generator=torch.Generator().manual_seed(seed), dtype=F64)


def latent_stats_of(x, w, cfg):
    """LatentStats of one layer computed directly from inputs x (uniform weights)."""
    c, _ = ref.project_latent(x, w, cfg, torch.arange(x.shape[1]))
    c = c.reshape(-1, cfg.kv_lora_rank)
    m = lambda: m2g.Moment(c.T @ c, c.sum(0), float(c.shape[0]))
    return m2g.LatentStats(k=m(), v=m(), count=c.shape[0])


# ----------------------------------------------------------------------------------------
def test_tapped_forward_is_the_reference_forward():
    cfg = mla_cfg()
    mw = mla_model(cfg)
    t = tokens(cfg, n=2)
    logits, lat = m2g._forward_tapped(t, mw, cfg)
    assert rel(logits, rm.forward(t, mw, cfg)) < 1e-14 and len(lat) == 2


@pytest.mark.parametrize("grouping", ["neighbor", "similarity"])
def test_full_rank_is_exact(grouping):
    """d_n' = M*N, d_v' = M*V (>= the stacked rank): logits equal the MLA source."""
    cfg = mla_cfg()
    mw = mla_model(cfg)
    G, M = 2, 4
    mw2, cfg2, rep = m2g.convert_mla_model(mw, cfg, num_query_groups=G, calib_tokens=tokens(cfg),
                                           grouping=grouping, qk_head_dim=M * 4, v_head_dim=M * 4)
    assert cfg2.num_query_groups == G and cfg2.qk_head_dim == 16 and cfg2.v_head_dim == 16
    assert mw2.layers[0].attn.W_UKV.shape == (G * 32, cfg.kv_lora_rank)
    t = tokens(cfg, n=2, S=13, seed=9)                       # not the calibration tokens
    err = rel(rm.forward(t, mw2, cfg2), rm.forward(t, mw, cfg))
    # the source through the independent per-head MLA formula, layer 0
    x = rand_x(cfg)
    w0 = mw.layers[0].attn
    src = ref.mla_attention_per_head(x, w0, w0.W_UKV, cfg)
    err_layer = rel(ref.attention_expanded(x, mw2.layers[0].attn, cfg2), src)
    print(f"\nMLA->GQLA full rank ({grouping}): logits rel-L2 {err:.1e}, layer (vs per-head MLA) "
          f"{err_layer:.1e}; groups {rep.layers[0].groups}")
    assert err < 1e-12 and err_layer < 1e-12
    assert min(e for l in rep.layers for e in l.k_energy + l.v_energy) > 1 - 1e-9


def test_lossy_error_decreases_with_rank():
    cfg = mla_cfg()
    mw = mla_model(cfg)
    w = mw.layers[0].attn
    x = rand_x(cfg, S=48, B=4)
    st = latent_stats_of(x, w, cfg)
    y0 = ref.mla_attention_per_head(x, w, w.W_UKV, cfg)
    errs, ke = [], []
    ranks = (2, 4, 8, 12, 16)
    for r in ranks:
        w2, c2, rep = m2g.convert_mla_layer(w, cfg, st, num_query_groups=2, qk_head_dim=r,
                                            v_head_dim=r, damping=0.0)
        errs.append(rel(ref.attention_expanded(x, w2, c2), y0))
        ke.append(sum(rep.k_energy) / 2)
    print("\nMLA->GQLA G=2, rank -> (layer rel-L2, mean K energy): "
          + ", ".join(f"{r}: ({e:.2e}, {k:.3f})" for r, e, k in zip(ranks, errs, ke)))
    assert all(a > b for a, b in zip(errs[:-1], errs[1:]))
    assert all(a < b for a, b in zip(ke[:-1], ke[1:]))
    assert errs[0] > 1e-2 and errs[-1] < 1e-12


def test_similarity_grouping_recovers_planted_groups():
    cfg = mla_cfg()
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(4)).tolist()
    planted = [sorted(perm[:4]), sorted(perm[4:])]
    assert planted != [[0, 1, 2, 3], [4, 5, 6, 7]]
    mw = mla_model(cfg, planted=planted, layers=1)
    t = tokens(cfg, n=2, S=13, seed=9)
    src = rm.forward(t, mw, cfg)
    res = {}
    for grouping in ("neighbor", "similarity"):
        mw2, cfg2, rep = m2g.convert_mla_model(mw, cfg, num_query_groups=2,
                                               calib_tokens=tokens(cfg), grouping=grouping)
        res[grouping] = (rel(rm.forward(t, mw2, cfg2), src), rep)
    print(f"\nplanted groups {planted}: neighbor logits rel-L2 {res['neighbor'][0]:.2e} (K energy "
          f"{res['neighbor'][1].layers[0].k_energy}), similarity {res['similarity'][0]:.1e} "
          f"groups {res['similarity'][1].layers[0].groups}")
    assert sorted(res["similarity"][1].layers[0].groups) == sorted(planted)
    assert res["similarity"][0] < 1e-10 < 1e-2 < res["neighbor"][0]
    # an explicit partition equal to the planted one gives the same result
    mw3, cfg3, _ = m2g.convert_mla_model(mw, cfg, num_query_groups=2, calib_tokens=tokens(cfg),
                                         grouping=planted)
    assert rel(rm.forward(t, mw3, cfg3), src) < 1e-10


def test_decode_paths_agree_after_conversion():
    cfg = mla_cfg()
    mw = mla_model(cfg)
    mw2, cfg2, _ = m2g.convert_mla_model(mw, cfg, num_query_groups=4, calib_tokens=tokens(cfg),
                                         grouping="similarity")
    t = tokens(cfg, n=2, S=8, seed=5)
    full = rm.forward(t, mw2, cfg2)
    for path in ("absorb", "gqa"):
        caches = rm.empty_caches(path, cfg2, mw2, 2)
        out, caches = rm.decode(t[:, :5], mw2, cfg2, caches)
        out2, _ = rm.decode(t[:, 5:], mw2, cfg2, caches)
        assert rel(torch.cat([out, out2], 1), full) < 1e-12, path


def test_hessian_weighting_runs_and_is_reported():
    cfg = mla_cfg()
    mw = mla_model(cfg)
    st_h = m2g.collect_latent_stats(mw, cfg, tokens(cfg), hessian_weighting=True)
    st_u = m2g.collect_latent_stats(mw, cfg, tokens(cfg))
    assert st_h[0].hessian_weighted and not st_u[0].hessian_weighted
    assert st_h[0].k.weight == st_u[0].k.weight == st_h[0].count      # mean weight 1
    assert rel(st_h[0].k.cc, st_u[0].k.cc) > 1e-2 and rel(st_h[0].k.cc, st_h[0].v.cc) > 1e-3
    mw2, cfg2, rep = m2g.convert_mla_model(mw, cfg, num_query_groups=2, stats=st_h,
                                           hessian_weighting=True)
    assert rep.hessian_weighting and "hessian=True" in rep.summary()
    with pytest.raises(ValueError, match="hessian_weighting"):
        m2g.convert_mla_model(mw, cfg, num_query_groups=2, stats=st_u, hessian_weighting=True)


@pytest.mark.parametrize("kw,match", [
    (dict(num_query_groups=3), "num_query_groups"),
    (dict(num_query_groups=0), "num_query_groups"),
    (dict(num_query_groups=2, qk_head_dim=17), "qk_head_dim"),
    (dict(num_query_groups=2, v_head_dim=0), "v_head_dim"),
    (dict(num_query_groups=2, grouping="random"), "grouping"),
    (dict(num_query_groups=2, grouping=[[0, 1, 2, 3], [4, 5, 6, 6]]), "partition"),
    (dict(num_query_groups=2, grouping=[[0, 1], [2, 3], [4, 5], [6, 7]]), "2 groups of 4"),
])
def test_bad_input_is_rejected_before_any_work(kw, match):
    cfg = mla_cfg()
    mw = mla_model(cfg, layers=1)
    with pytest.raises(ValueError, match=match):
        m2g.convert_mla_model(mw, cfg, calib_tokens=tokens(cfg), **kw)


def test_bad_stats_and_calibration():
    cfg = mla_cfg()
    mw = mla_model(cfg, layers=1)
    with pytest.raises(ValueError, match="exactly one"):
        m2g.convert_mla_model(mw, cfg, num_query_groups=2)
    with pytest.raises(ValueError, match="calib_tokens"):
        m2g.convert_mla_model(mw, cfg, num_query_groups=2, calib_tokens=torch.zeros(0, 4).long())
    st = latent_stats_of(rand_x(cfg), mw.layers[0].attn, cfg)
    bad = dataclasses.replace(st, k=m2g.Moment(torch.zeros(5, 5, dtype=F64), torch.zeros(5), 1.0))
    with pytest.raises(ValueError, match=r"stats.k.cc"):
        m2g.convert_mla_layer(mw.layers[0].attn, cfg, bad, num_query_groups=2)
