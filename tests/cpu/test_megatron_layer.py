"""CPU unit tier: the Megatron GQLA layer/model (local spec, TP=1) against the math reference,
through the single name table in gqla_megatron/megatron/adapters.py. Forward AND gradients."""

import pytest
import torch

pytest.importorskip("megatron.core")

from gqla_megatron import reference as ref  # noqa: E402
from gqla_megatron import reference_model as refm  # noqa: E402
from gqla_megatron.megatron import adapters, build_gqla_gpt_model, tiny_config  # noqa: E402
from gqla_megatron.testing import FP32_PARITY, FP32_PARITY_MAX, assert_close_report, model_parallel  # noqa: E402

VOCAB, SEQ = 128, 16


def build(**kw):
    cfg = tiny_config(**kw)
    model = build_gqla_gpt_model(cfg, vocab_size=VOCAB, max_sequence_length=64)
    return cfg, model


def tokens(b=2, s=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, VOCAB, (b, s), generator=g)
    return t, torch.arange(s)[None].expand(b, s)


@pytest.mark.parametrize("q_lora_rank", [24, None])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_model_logits_match_reference(q_lora_rank, groups):
    with model_parallel(1, 1):
        cfg, model = build(q_lora_rank=q_lora_rank, num_query_groups=groups)
        tok, pos = tokens()
        with torch.no_grad():
            logits = model(tok, pos, None)
        mw = adapters.model_to_reference(dict(model.named_parameters()), cfg.gqla, cfg.num_layers)
        expected = refm.forward(tok, mw, cfg.gqla)
        assert_close_report("logits fp32", logits, expected, rel_l2=FP32_PARITY, rel=FP32_PARITY_MAX)
        expected64 = refm.forward(tok, mw.to(torch.float64), cfg.gqla)
        assert_close_report("logits vs fp64", logits, expected64, rel_l2=FP32_PARITY, rel=FP32_PARITY_MAX)


def test_attention_layer_gradients_match_reference():
    """Gradients of every attention weight and of the input, Megatron vs reference autograd."""
    with model_parallel(1, 1):
        cfg, model = build()
        attn = model.decoder.layers[0].self_attention
        s, b = 12, 3
        x = torch.randn(s, b, cfg.hidden_size, requires_grad=True)
        probe = torch.randn(s, b, cfg.hidden_size)
        out, _ = attn(x, None)
        (out * probe).sum().backward()

        sd = {k: v.detach().clone().requires_grad_(True)
              for k, v in model.decoder.layers[0].named_parameters()}
        lw = adapters.layer_to_reference(sd, "", cfg.gqla)
        x_ref = x.detach().transpose(0, 1).clone().requires_grad_(True)
        y = ref.attention_expanded(x_ref, lw.attn, cfg.gqla)
        (y * probe.transpose(0, 1)).sum().backward()

        assert_close_report("attn out", out.transpose(0, 1), y, rel_l2=FP32_PARITY, rel=FP32_PARITY_MAX)
        assert_close_report("d input", x.grad.transpose(0, 1), x_ref.grad, rel_l2=FP32_PARITY, rel=FP32_PARITY_MAX)
        n_checked = 0
        for name, p in attn.named_parameters():
            key = "self_attention." + name
            assert_close_report(f"grad {key}", p.grad, sd[key].grad, rel_l2=FP32_PARITY, rel=FP32_PARITY_MAX)
            n_checked += 1
        assert n_checked == 7  # q_down, q_up, q_norm, kv_down, kv_norm, kv_up, proj


def test_kv_up_proj_is_per_group():
    with model_parallel(1, 1):
        cfg, model = build(num_query_groups=2)
        w = model.decoder.layers[0].self_attention.linear_kv_up_proj.weight
        assert tuple(w.shape) == (2 * (cfg.qk_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)


def test_adapter_round_trip_and_missing_key():
    with model_parallel(1, 1):
        cfg, model = build()
        sd = dict(model.decoder.layers[1].named_parameters())
        lw = adapters.layer_to_reference(sd, "", cfg.gqla)
        back = adapters.layer_from_reference(lw, "", cfg.gqla)
        assert set(back) == set(sd)
        for k in sd:
            assert torch.equal(back[k], sd[k])
        del sd["self_attention.linear_kv_up_proj.weight"]
        with pytest.raises(KeyError, match="linear_kv_up_proj"):
            adapters.layer_to_reference(sd, "", cfg.gqla)


def test_static_inference_cache_matches_full_forward():
    """Megatron's own static KV cache holds g/TP KV heads for GQLA; prefill + decode steps
    reproduce the full-sequence logits."""
    from megatron.core.inference.contexts import StaticInferenceContext

    with model_parallel(1, 1):
        cfg, model = build()
        model.eval()
        tok, pos = tokens(b=2, s=10)
        with torch.no_grad():
            full = model(tok, pos, None)
            ctx = StaticInferenceContext(max_batch_size=2, max_sequence_length=32)
            ctx.materialize_only_last_token_logits = False
            outs = [model(tok[:, :6], pos[:, :6], None, inference_context=ctx, runtime_gather_output=True)]
            ctx.sequence_len_offset += 6
            for t in range(6, 10):
                outs.append(model(tok[:, t:t + 1], pos[:, t:t + 1], None, inference_context=ctx, runtime_gather_output=True))
                ctx.sequence_len_offset += 1
        k_cache, _ = ctx.key_value_memory_dict[1]
        assert k_cache.shape[2] == cfg.num_query_groups  # g KV heads, not h_q
        assert_close_report("static-cache decode", torch.cat(outs, 1), full, rel_l2=FP32_PARITY, rel=FP32_PARITY_MAX)


def test_stock_megatron_lm_spec_hook_with_plain_mla_config():
    """What Megatron-LM's --spec does: import the object by name, build a GPTModel from a plain
    MLATransformerConfig (num_query_groups = g), and get GQLA layers."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import import_module
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    spec = import_module(("gqla_megatron.megatron.mlm_spec", "gqla_local_layer_spec"))
    kw = dict(tiny_config().__dict__)
    with model_parallel(1, 1):
        cfg = MLATransformerConfig(**{k: v for k, v in kw.items() if k in MLATransformerConfig.__dataclass_fields__})
        model = GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=64, position_embedding_type="rope")
        w = model.decoder.layers[0].self_attention.linear_kv_up_proj.weight
        assert w.shape[0] == cfg.num_query_groups * (cfg.qk_head_dim + cfg.v_head_dim)
        tok, pos = tokens()
        assert torch.isfinite(model(tok, pos, None)).all()
        bad = MLATransformerConfig(**{**{k: v for k, v in kw.items() if k in MLATransformerConfig.__dataclass_fields__},
                                      "num_query_groups": 8, "tensor_model_parallel_size": 1})
        bad.num_query_groups = 3  # as a mistyped --num-query-groups would arrive
        with pytest.raises(ValueError, match=r"num_query_groups \(3\) must divide"):
            GPTModel(bad, spec, vocab_size=VOCAB, max_sequence_length=64, position_embedding_type="rope")
