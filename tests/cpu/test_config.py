"""CPU unit tier: every config error names its field; nothing is silently rounded."""

import pytest

from gqla_megatron.config import GQLAConfig

BASE = dict(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_lora_rank=32,
            qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16)


@pytest.mark.parametrize("change,match", [
    (dict(num_query_groups=3), r"num_query_groups \(3\) must divide num_attention_heads \(8\)"),
    (dict(qk_pos_emb_head_dim=7), r"qk_pos_emb_head_dim \(7\) must be even"),
    (dict(kv_lora_rank=0), r"kv_lora_rank must be a positive integer"),
    (dict(v_head_dim=-1), r"v_head_dim must be a positive integer"),
    (dict(q_lora_rank=0), r"q_lora_rank must be a positive integer"),
    (dict(hidden_size=64.0), r"hidden_size must be a positive integer"),
    (dict(rotary_base=0), r"rotary_base must be > 0"),
])
def test_gqla_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        GQLAConfig(**{**BASE, **change})


def test_gqla_config_json_round_trip_and_unknown_field():
    cfg = GQLAConfig(**BASE, q_lora_rank=24)
    assert GQLAConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=r"unknown GQLAConfig field\(s\): \['bogus'\]"):
        GQLAConfig.from_dict({**BASE, "bogus": 1})


megatron = pytest.importorskip("megatron.core")


def mcfg(**kw):
    from gqla_megatron.megatron import tiny_config

    return tiny_config(**kw)


@pytest.mark.parametrize("change,match", [
    (dict(num_query_groups=3), r"num_query_groups \(3\) must divide num_attention_heads \(8\)"),
    (dict(num_query_groups=None), r"num_query_groups must be set"),
    (dict(num_query_groups=2, tensor_model_parallel_size=4),
     r"tensor_model_parallel_size \(4\) must divide num_query_groups \(2\)"),
    (dict(fp8="hybrid", kv_lora_rank=24), r"with fp8='hybrid', kv_lora_rank \(24\) must be a multiple of 16"),
    (dict(fp8="hybrid", kv_lora_rank=32, qk_pos_emb_head_dim=10),
     r"kv_lora_rank \+ qk_pos_emb_head_dim \(42\) must be a multiple of 16"),
    (dict(fp8="e4m3", q_lora_rank=24, kv_lora_rank=32, qk_pos_emb_head_dim=16),
     r"q_lora_rank \(24\) must be a multiple of 16"),
    (dict(qk_pos_emb_head_dim=9), r"qk_pos_emb_head_dim \(9\) must be even"),
    (dict(rotary_percent=0.5), r"rotary_percent \(0.5\) must be 1.0"),
    (dict(rope_type="mrope"), r"rope_type must be 'rope' or 'yarn'"),
    (dict(multi_latent_attention=False), r"multi_latent_attention must be True"),
    (dict(cache_mla_latents=True), r"cache_mla_latents must be False"),
    (dict(context_parallel_size=2), r"context_parallel_size \(2\) must be 1"),
])
def test_megatron_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        mcfg(**change)


def test_megatron_config_keeps_values_and_exposes_gqla():
    cfg = mcfg(num_query_groups=2)
    assert cfg.num_query_groups == 2 and cfg.gqla.heads_per_group == 4
    assert cfg.gqla.kv_lora_rank == cfg.kv_lora_rank == 32


def test_te_backend_without_te_is_a_clear_error():
    from gqla_megatron.megatron.spec import get_gqla_layer_spec, te_available

    if te_available():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ValueError, match="backend 'te' needs Transformer Engine"):
        get_gqla_layer_spec("te")
    with pytest.raises(ValueError, match="backend must be one of"):
        get_gqla_layer_spec("apex")


def test_from_run_args_reads_both_checkpoint_writers():
    """gqla-pretrain records --norm-epsilon as norm_epsilon, gqla-convert as layernorm_epsilon;
    both reach the config (and a missing shape field names itself)."""
    shape = dict(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_lora_rank=32, qk_head_dim=16,
                 qk_pos_emb_head_dim=8, v_head_dim=16, q_lora_rank=None)
    assert GQLAConfig.from_run_args(dict(shape, norm_epsilon=1e-6)).layernorm_epsilon == 1e-6
    c = GQLAConfig.from_run_args(dict(shape, layernorm_epsilon=1e-6, rotary_base=1e5, qk_layernorm=False))
    assert (c.layernorm_epsilon, c.rotary_base, c.qk_layernorm) == (1e-6, 1e5, False)
    d = GQLAConfig.from_run_args(shape)
    assert (d.layernorm_epsilon, d.rotary_base, d.qk_layernorm) == (1e-5, 10000.0, True)
    with pytest.raises(KeyError, match="kv_lora_rank"):
        GQLAConfig.from_run_args({k: v for k, v in shape.items() if k != "kv_lora_rank"})
