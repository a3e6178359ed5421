"""CPU tier: multi-token prediction. The reference MTP forward against Megatron-Core 0.16.1's
MultiTokenPredictionLayer (loss and gradients: an MTP GPTModel cannot return plain logits), and
MTP speculative decoding in the engine: tokens identical to plain greedy decoding on both paths,
drafts exactly those of the reference MTP forward (acceptance counts predicted from it)."""

import pytest
import torch

from gqla_megatron import reference as ref
from gqla_megatron import reference_model as refm
from gqla_megatron.config import GQLAConfig
from gqla_megatron.inference.engine import GQLAEngine, SamplingParams
from gqla_megatron.roofline import get_device
from gqla_megatron.testing import FP32_PARITY, FP32_PARITY_MAX, assert_close_report, random_model_weights

H100 = get_device("H100")
CFG = GQLAConfig(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_lora_rank=32,
                 qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, q_lora_rank=24)


def with_mtp(mw, cfg, depths, seed=0):
    """Random MTP depths on top of reference weights (norms near 1, eh_proj ~ 1/sqrt(2D))."""
    g = torch.Generator().manual_seed(1000 + seed)
    D = cfg.hidden_size
    donor = random_model_weights(cfg, vocab=mw.embedding.shape[0], layers=depths, seed=500 + seed)
    mw.mtp = [refm.MTPWeights(enorm=1 + 0.1 * torch.randn(D, generator=g), hnorm=1 + 0.1 * torch.randn(D, generator=g),
                              eh_proj=torch.randn(D, 2 * D, generator=g) / (2 * D) ** 0.5, layer=lw,
                              final_norm=1 + 0.1 * torch.randn(D, generator=g)) for lw in donor.layers]
    return mw


# ---- reference MTP vs Megatron ---------------------------------------------------------
@pytest.mark.parametrize("depths", [1, 2])
def test_reference_mtp_loss_and_grads_match_megatron(depths):
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

    from gqla_megatron.megatron import adapters, build_gqla_gpt_model, tiny_config
    from gqla_megatron.testing import model_parallel

    V, S = 96, 12
    with model_parallel(1, 1):
        cfg = tiny_config(mtp_num_layers=depths)
        torch.manual_seed(3)
        model = build_gqla_gpt_model(cfg, vocab_size=V, max_sequence_length=64)
        g = torch.Generator().manual_seed(0)
        tok = torch.randint(0, V, (2, S), generator=g)
        labels = torch.roll(tok, -1, 1)
        mask = torch.ones(2, S)
        mask[1, -3:] = 0
        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        MTPLossLoggingHelper.tracker.clear()
        model.train()  # dropout is 0; training mode makes Megatron log the MTP loss
        loss = model(tok, torch.arange(S)[None].expand(2, S), None, labels=labels, loss_mask=mask)
        (loss * mask).sum().backward()
        got = MTPLossLoggingHelper.tracker["values"].clone()
        MTPLossLoggingHelper.tracker.clear()

        sd = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        assert adapters.num_mtp_layers(sd) == depths
        mw = adapters.model_to_reference(sd, cfg.gqla, cfg.num_layers, mtp_num_layers=depths)
        losses = refm.mtp_losses(tok, labels, mw, cfg.gqla, mask)
        assert_close_report("MTP loss per depth", got, torch.stack(losses).detach(), rel_l2=FP32_PARITY, rel=FP32_PARITY_MAX)
        # gradients: the main per-token loss (masked sum) + 0.1 / D * each depth's mean loss
        main = refm.forward(tok, mw, cfg.gqla)
        ce = torch.nn.functional.cross_entropy(main.flatten(0, 1), labels.flatten(), reduction="none")
        total = (ce * mask.flatten()).sum() + cfg.mtp_loss_scaling_factor / depths * sum(losses)
        total.backward()
        for n, p in model.named_parameters():
            if n.startswith("mtp.") or n == "embedding.word_embeddings.weight":
                assert_close_report(f"grad {n}", p.grad, sd[n].grad, rel_l2=2 * FP32_PARITY, rel=FP32_PARITY_MAX)
        # a wrong concat order ([hidden ; embedding]) must be caught
        m0 = mw.mtp[0]
        D = cfg.hidden_size
        swapped = refm.MTPWeights(m0.enorm, m0.hnorm, torch.cat([m0.eh_proj[:, D:], m0.eh_proj[:, :D]], 1),
                                  m0.layer, m0.final_norm)
        bad = refm.mtp_losses(tok, labels, refm.ModelWeights(mw.embedding, mw.layers, mw.final_norm, mw.output,
                                                             mw.eps, [swapped]), cfg.gqla, mask)
        assert abs(bad[0].item() - got[0].item()) > 1e-3


# ---- speculative decoding in the engine ------------------------------------------------
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [5], [4, 2, 3, 1], [3, 3]]


def spec_model(depths, vocab=100, seed=0):
    return with_mtp(random_model_weights(CFG, vocab=vocab, seed=seed), CFG, depths, seed)


@pytest.mark.parametrize("path", ["absorb", "gqa"])
@pytest.mark.parametrize("depths,k", [(1, 1), (2, 2), (2, 1)])
def test_speculative_tokens_identical_to_greedy(path, depths, k):
    mw = spec_model(depths)
    params = SamplingParams(max_new_tokens=20)
    plain = GQLAEngine(mw, CFG, decode_path=path, max_batch=4, max_seq_len=40, device_spec=H100).generate(PROMPTS, params)
    eng = GQLAEngine(mw, CFG, decode_path=path, max_batch=4, max_seq_len=40, device_spec=H100,
                     speculative=True, num_speculative_tokens=k)
    assert eng.path == path and eng.decision.absorb.s_q == 1 + k
    got = eng.generate(PROMPTS, params)
    for a, b in zip(got, plain):
        assert a.tokens == b.tokens and len(a.tokens) == 20
        assert (a.logits - b.logits).abs().max() <= 1e-5
    st = eng.stats
    assert st["speculative"] and st["num_speculative_tokens"] == k
    assert st["drafted"] == k * sum(r.steps for r in got) and st["accepted"] == sum(r.accepted_drafts for r in got)
    # every step emits accepted + 1 tokens; the last step of a request may be cut at max_new_tokens
    for r in got:
        assert r.steps + r.accepted_drafts >= len(r.tokens) - 1 >= r.steps


def reference_acceptance(mw, prompt, max_new, k):
    """(steps, accepted drafts) that MTP speculation must give, predicted from the reference:
    the true greedy continuation and the reference MTP forward over it. Depth i's draft at the
    last accepted position equals the reference one whenever drafts 1..i-1 were right, and a
    wrong earlier draft ends the acceptance anyway."""
    seq = list(prompt)
    for _ in range(max_new + 2 * k + 1):
        seq.append(int(refm.forward(torch.tensor(seq)[None], mw, CFG)[0, -1].argmax()))
    _, mtp = refm.mtp_forward(torch.tensor(seq)[None], mw, CFG)
    L = len(prompt)
    n, emitted, steps, acc = L + 1, 1, 0, 0
    while emitted < max_new:
        drafts = [int(mtp[i][0, n - 2].argmax()) for i in range(k)]
        a = 0
        while a < k and drafts[a] == seq[n + a]:
            a += 1
        steps, acc, emitted, n = steps + 1, acc + a, emitted + a + 1, n + a + 1
    return steps, acc


@pytest.mark.parametrize("path,depths", [("absorb", 2), ("gqa", 1)])
def test_drafts_and_acceptance_match_the_reference_mtp(path, depths):
    # a 5-token vocabulary makes random drafts right often enough to exercise acceptance
    mw = spec_model(depths, vocab=5, seed=2)
    prompts = [[1, 2, 3, 4, 0, 1], [2], [4, 4, 1]]
    eng = GQLAEngine(mw, CFG, decode_path=path, max_batch=3, max_seq_len=40, device_spec=H100, speculative=True)
    got = eng.generate(prompts, SamplingParams(max_new_tokens=16))
    total = 0
    for p, r in zip(prompts, got):
        assert (r.steps, r.accepted_drafts) == reference_acceptance(mw, p, 16, depths)
        total += r.accepted_drafts
    assert total > 0 and eng.stats["acceptance_rate"] > 0
    assert eng.stats["tokens_per_step"] == pytest.approx(1 + eng.stats["accepted"] / eng.stats["row_steps"])


def test_speculative_path_switch_and_stop_tokens():
    mw = spec_model(2, seed=3)
    plain = GQLAEngine(mw, CFG, decode_path="absorb", max_batch=4, max_seq_len=40, device_spec=H100)
    eng = GQLAEngine(mw, CFG, decode_path="absorb", max_batch=4, max_seq_len=40, device_spec=H100, speculative=True)
    base = plain.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    switched = eng.generate(PROMPTS, SamplingParams(max_new_tokens=16), switch_at=3, switch_to="gqa")
    assert eng.path == "gqa" and [r.tokens for r in switched] == [r.tokens for r in base]
    stop = base[0].tokens[5]
    got = eng.generate(PROMPTS, SamplingParams(max_new_tokens=16, stop_tokens=(stop,)))
    ref_stop = plain.generate(PROMPTS, SamplingParams(max_new_tokens=16, stop_tokens=(stop,)))
    assert [r.tokens for r in got] == [r.tokens for r in ref_stop]


def test_speculative_bad_options():
    mw = spec_model(1)
    with pytest.raises(ValueError, match="needs MTP layers"):
        GQLAEngine(random_model_weights(CFG), CFG, device_spec=H100, speculative=True)
    with pytest.raises(ValueError, match="num_speculative_tokens must be in"):
        GQLAEngine(mw, CFG, device_spec=H100, speculative=True, num_speculative_tokens=2)
    eng = GQLAEngine(mw, CFG, device_spec=H100, speculative=True, max_seq_len=32)
    with pytest.raises(ValueError, match="greedy only"):
        eng.generate([[1, 2]], SamplingParams(temperature=0.7))
    res = eng.generate([[1, 2], []], SamplingParams(max_new_tokens=3))
    assert len(res[0].tokens) == 3 and res[1].error == "empty prompt"


def test_auto_path_uses_s_q_of_the_speculative_step():
    from gqla_megatron.roofline import choose_decode_path

    mw = spec_model(2)
    eng = GQLAEngine(mw, CFG, decode_path="auto", max_batch=4, max_seq_len=64, device_spec=H100, speculative=True)
    want = choose_decode_path(CFG, H100, s_q=3, batch=4, context=64, dtype_bytes=4)
    assert eng.decision.path == want.path and eng.decision.absorb.s_q == eng.decision.gqa.s_q == 3


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_warmup_gets_every_query_count_decode_uses(k, monkeypatch):
    """The backend's load-time warm-up is told the query counts of every decode call: 1 plain;
    1 + k for the main model and k + m for MTP depth m under speculation (k + 1 .. 2k)."""
    from gqla_megatron.inference import backends as bk

    warmed, used = [], set()
    monkeypatch.setattr(bk.DecodeBackend, "warmup", lambda self, *a, **kw: warmed.append(kw["s_q"]) or [])
    attend = bk.TorchAbsorb.attend
    monkeypatch.setattr(bk.TorchAbsorb, "attend",
                        lambda self, prep, q_nope, *a: used.add(q_nope.shape[1]) or attend(self, prep, q_nope, *a))
    mw = spec_model(3)
    eng = GQLAEngine(mw, CFG, decode_path="absorb", max_batch=2, max_seq_len=40, device_spec=H100,
                     speculative=k > 0, num_speculative_tokens=k or None,
                     decode_backend="torch_absorb")   # also under TRITON_INTERPRET (Triton otherwise)
    eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=8))
    assert warmed == [tuple(range(k + 1, 2 * k + 1)) if k else (1,)]
    assert used == set(warmed[0])


@pytest.mark.parametrize("path", ["absorb", "gqa"])
def test_every_draft_equals_the_reference_mtp_forward(path, monkeypatch):
    """Each step's k drafts (read from the engine state before verification) against the reference
    MTP forward over the accepted tokens, depth i fed drafts 1..i-1 as its shifted tokens; this
    checks the MTP caches, their recompute after rejections and the hidden-state history even
    when few drafts are accepted."""
    mw = spec_model(2, seed=4)
    seen = []
    orig = GQLAEngine._spec_step

    def spy(self, st):
        seen.append((st["n"].clone(), st["tok"].clone(), st["frozen"].clone()))
        return orig(self, st)

    monkeypatch.setattr(GQLAEngine, "_spec_step", spy)
    eng = GQLAEngine(mw, CFG, decode_path=path, max_batch=4, max_seq_len=40, device_spec=H100, speculative=True)
    eng.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    checked = 0
    for n, tok, frozen in seen:
        for b in range(len(PROMPTS)):
            if frozen[b]:
                continue
            nb = int(n[b])
            accepted, drafts = tok[b, :nb].tolist(), tok[b, nb:nb + 2].tolist()
            for i in (1, 2):
                _, mtp = refm.mtp_forward(torch.tensor(accepted + drafts[:i - 1])[None], mw, CFG)
                assert int(mtp[i - 1][0, nb - 2].argmax()) == drafts[i - 1], (b, nb, i)
                checked += 1
    assert checked >= 40


def test_speculative_on_the_static_buffer_graph_path():
    from gqla_megatron.inference.engine import StepGraphs

    mw = spec_model(2, seed=5)
    params = SamplingParams(max_new_tokens=12)
    eng = GQLAEngine(mw, CFG, decode_path="absorb", max_batch=8, max_seq_len=40, device_spec=H100, speculative=True)
    base = eng.generate(PROMPTS[:3], params)
    eng._graphs = StepGraphs(capture=False)
    got = eng.generate(PROMPTS[:3], params)  # 3 requests in a bucket of 4 (one frozen padding row)
    assert eng._cache_rows == 4 and [r.tokens for r in got] == [r.tokens for r in base]
    assert {k[0] for k in eng._graphs.entries} == {"main", ("mtp", 1), ("mtp", 2)}


def test_benchmark_state_helpers_run_both_modes():
    mw = spec_model(1, seed=6)
    for spec in (False, True):
        eng = GQLAEngine(mw, CFG, decode_path="gqa", max_batch=4, max_seq_len=64, device_spec=H100, speculative=spec)
        st = eng.fill_random_context(3, 40)
        assert float(eng.caches[0]["v"][:, :40].abs().sum()) > 0 and float(eng.caches[0]["v"][:, 40:].abs().sum()) == 0
        emitted = [eng.bench_step(st) for _ in range(3)]
        assert all(e.shape == (3,) and bool((e >= 1).all()) for e in emitted)
    with pytest.raises(ValueError, match="context must be"):
        eng.fill_random_context(1, 63)
