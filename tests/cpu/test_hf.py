"""CPU tier: Hugging Face safetensors import (LLaMA-family GQA) and GQLA export (gqla and
DeepSeek-V3 layouts), checked against transformers' own models on CPU in fp32."""

import dataclasses
import json
import os

import pytest
import torch

from gqla_megatron import reference_model as rm
from gqla_megatron.config import GQLAConfig
from gqla_megatron.conversion import gguf_import as gi
from gqla_megatron.conversion import hf
from gqla_megatron.testing import assert_close_report, compare, random_model_weights

transformers = pytest.importorskip("transformers", reason="needs transformers")
pytest.importorskip("safetensors", reason="needs safetensors")

# fp32 end-to-end logits of two independent implementations (measured ~1e-7 rel-L2)
FP32_LOGITS = 1e-5


def _randomize_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


def tiny_llama(tmp_path, *, tie=True, shard=False, name="llama", **over):
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
              tie_word_embeddings=tie, max_position_embeddings=128)
    kw.update(over)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    _randomize_norms(model)
    path = str(tmp_path / name)
    model.save_pretrained(path, **({"max_shard_size": "20KB"} if shard else {}))
    return model, path


# ----------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie,shard", [(True, False), (False, True)])
def test_llama_import_matches_transformers(tmp_path, tie, shard):
    model, path = tiny_llama(tmp_path, tie=tie, shard=shard)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json")) == shard
    w, cfg, tok = hf.load_hf_gqa(path)
    assert tok is None and w.tied_output == tie and (w.output is w.embedding) == tie
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_base) == (2, 16, 500.0)
    tokens = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    r = assert_close_report("hf llama vs gqa_forward", gi.gqa_forward(tokens, w, cfg), expected,
                            rel_l2=FP32_LOGITS)
    print(f"\nLLaMA import (tie={tie}, sharded={shard}): logits rel-L2 {r['rel_l2']:.1e}")


def test_mistral_import_and_zero_qwen2_bias(tmp_path):
    torch.manual_seed(0)
    mc = transformers.MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=12, sliding_window=64,
                                    tie_word_embeddings=False)
    m = transformers.MistralForCausalLM(mc).eval()
    _randomize_norms(m)
    m.save_pretrained(str(tmp_path / "mi"))
    with pytest.warns(UserWarning, match="sliding_window"):
        w, cfg, _ = hf.load_hf_gqa(str(tmp_path / "mi"))
    assert cfg.head_dim == 12 and not w.tied_output
    t = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert_close_report("mistral", gi.gqa_forward(t, w, cfg), m(t).logits, rel_l2=FP32_LOGITS)
    # Qwen2: zero q/k/v biases are accepted, non-zero ones are rejected by name
    qc = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    q = transformers.Qwen2ForCausalLM(qc).eval()
    with torch.no_grad():
        for mod in q.model.layers[0].self_attn.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.zero_()
    q.save_pretrained(str(tmp_path / "q0"))
    w, cfg, _ = hf.load_hf_gqa(str(tmp_path / "q0"))
    with torch.no_grad():
        assert_close_report("qwen2 zero bias", gi.gqa_forward(t, w, cfg), q(t).logits,
                            rel_l2=FP32_LOGITS)
        q.model.layers[0].self_attn.k_proj.bias.fill_(0.1)
    q.save_pretrained(str(tmp_path / "q1"))
    with pytest.raises(ValueError, match=r"k_proj.bias.*non-zero bias"):
        hf.load_hf_gqa(str(tmp_path / "q1"))


def _edit_config(path, **changes):
    p = os.path.join(path, "config.json")
    with open(p) as fh:
        c = json.load(fh)
    c.update(changes)
    with open(p, "w") as fh:
        json.dump(c, fh)


def test_import_bad_input(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = tiny_llama(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        hf.load_hf_gqa(str(tmp_path / "nope"))
    st = os.path.join(path, "model.safetensors")
    tensors = load_file(st)
    # missing key
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, st)
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.v_proj.weight' is missing"):
        hf.load_hf_gqa(path)
    # leftover key
    tensors["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(32, 64)
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, st)
    with pytest.raises(ValueError, match="not used.*model.extra.weight"):
        hf.load_hf_gqa(path)
    del tensors["model.extra.weight"]
    # wrong shape
    tensors["model.norm.weight"] = torch.zeros(63)
    save_file(tensors, st)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(63,\)"):
        hf.load_hf_gqa(path)
    # truncated file
    with open(st, "rb") as fh:
        data = fh.read()
    with open(st, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot open safetensors"):
        hf.load_hf_gqa(path)
    # config problems (checked before any tensor is read)
    _, path = tiny_llama(tmp_path, name="b")
    _edit_config(path, model_type="gpt2")
    with pytest.raises(ValueError, match="model_type"):
        hf.load_hf_gqa(path)
    _edit_config(path, model_type="llama",
                 rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type"):
        hf.load_hf_gqa(path)
    _edit_config(path, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                 rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_scaling"):
        hf.load_hf_gqa(path)
    _edit_config(path, rope_scaling=None, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        hf.load_hf_gqa(path)


# ----------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------
def gqla_cfg(q_lora_rank, **over):
    kw = dict(hidden_size=48, num_attention_heads=6, num_query_groups=2, kv_lora_rank=16,
              qk_head_dim=8, qk_pos_emb_head_dim=8, v_head_dim=12, q_lora_rank=q_lora_rank,
              rotary_base=100.0, layernorm_epsilon=1e-6, qk_layernorm=True)
    kw.update(over)
    return GQLAConfig(**kw)


def _model(cfg, tie=False):
    mw = dataclasses.replace(random_model_weights(cfg, vocab=80, layers=2, seed=1), eps=1e-5)
    mw.final_norm = 1 + 0.1 * torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    if tie:
        mw.output = mw.embedding
    return mw


@pytest.mark.parametrize("q_lora_rank,qk_layernorm,tie", [(24, True, False), (None, True, True),
                                                          (24, False, True)])
def test_gqla_layout_round_trip_is_exact(tmp_path, q_lora_rank, qk_layernorm, tie):
    cfg = gqla_cfg(q_lora_rank, qk_layernorm=qk_layernorm)
    mw = _model(cfg, tie)
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"not": "checked"}')
    out = str(tmp_path / "out")
    hf.save_hf_gqla(out, mw, cfg, layout="gqla", tokenizer_path=str(tok), max_shard_bytes=20000)
    c = json.load(open(os.path.join(out, "config.json")))
    assert c["model_type"] == "gqla" and c["num_key_value_heads"] == 2
    assert c["architectures"] == ["GQLAForCausalLM"] and c["tie_word_embeddings"] == tie
    mw2, cfg2, tok2 = hf.load_hf_gqla(out)
    assert cfg2 == cfg and tok2 == os.path.join(out, "tokenizer.json") and mw2.eps == mw.eps
    assert (mw2.output is mw2.embedding) == tie
    pairs = [(mw.embedding, mw2.embedding), (mw.output, mw2.output), (mw.final_norm, mw2.final_norm)]
    for a, b in zip(mw.layers, mw2.layers):
        pairs += [(a.input_norm, b.input_norm), (a.mlp_norm, b.mlp_norm), (a.W_fc1, b.W_fc1),
                  (a.W_fc2, b.W_fc2)]
        for f in dataclasses.fields(a.attn):
            x, y = getattr(a.attn, f.name), getattr(b.attn, f.name)
            assert (x is None) == (y is None), f.name
            if x is not None:
                pairs.append((x, y))
    assert all(torch.equal(a, b) for a, b in pairs)
    # no temporary directory left behind
    assert sorted(os.listdir(tmp_path)) == ["out", "tokenizer.json"]


@pytest.mark.parametrize("q_lora_rank,rope_interleave", [(24, True), (None, True), (24, False)])
def test_deepseek_v3_layout_matches_transformers(tmp_path, q_lora_rank, rope_interleave):
    cfg = gqla_cfg(q_lora_rank)
    mw = _model(cfg)
    out = str(tmp_path / "ds")
    hf.save_hf_gqla(out, mw, cfg, layout="deepseek_v3", rope_interleave=rope_interleave)
    c = json.load(open(os.path.join(out, "config.json")))
    assert c["num_key_value_heads"] == cfg.num_attention_heads and c["rope_scaling"] is None
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.model.layers[0].self_attn.kv_b_proj.weight.shape == (6 * 20, 16)
    assert model.model.layers[0].self_attn.scaling == cfg.softmax_scale
    tokens = torch.randint(0, 80, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(tokens).logits
    expected = rm.forward(tokens, mw, cfg)
    r = assert_close_report("DeepseekV3 vs reference", got, expected, rel_l2=FP32_LOGITS)
    print(f"\nDeepSeek-V3 export (q_lora_rank={q_lora_rank}, rope_interleave={rope_interleave}): "
          f"logits rel-L2 {r['rel_l2']:.1e}")
    # negative control: the other RoPE convention on the same rows is visibly wrong
    model.config.rope_interleave = not rope_interleave
    with torch.no_grad():
        wrong = model(tokens).logits
    assert compare(wrong, expected)["rel_l2"] > 100 * FP32_LOGITS


def test_export_bad_input(tmp_path):
    cfg = gqla_cfg(24)
    mw = _model(cfg)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        hf.save_hf_gqla(str(tmp_path / "exists"), mw, cfg)
    with pytest.raises(ValueError, match="layout"):
        hf.save_hf_gqla(str(tmp_path / "a"), mw, cfg, layout="mla")
    with pytest.raises(ValueError, match="layernorm_epsilon"):
        hf.save_hf_gqla(str(tmp_path / "a"), mw, dataclasses.replace(cfg, layernorm_epsilon=1e-5),
                        layout="deepseek_v3")
    nn = gqla_cfg(24, qk_layernorm=False)
    with pytest.raises(ValueError, match="qk_layernorm"):
        hf.save_hf_gqla(str(tmp_path / "a"), _model(nn), nn, layout="deepseek_v3")
    with pytest.raises(ValueError, match="W_UKV"):
        hf.save_hf_gqla(str(tmp_path / "a"), mw, dataclasses.replace(cfg, num_query_groups=3))
    with pytest.raises(ValueError, match="tokenizer_path"):
        hf.save_hf_gqla(str(tmp_path / "a"), mw, cfg, tokenizer_path=str(tmp_path / "none.json"))
    assert sorted(os.listdir(tmp_path)) == ["exists"]
    hf.save_hf_gqla(str(tmp_path / "ds"), mw, cfg, layout="deepseek_v3")
    with pytest.raises(ValueError, match="model_type"):
        hf.load_hf_gqla(str(tmp_path / "ds"))


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_deepseek_v3_layout_reads_back_as_mla_and_regroups_exactly(tmp_path, rope_interleave):
    """GQLA (g=2) -> DeepSeek-V3 dir -> load_hf_mla (per-head MLA, g=h_q) -> mla_to_gqla with
    neighbour groups of the original size: the same model (each group's stacked per-head
    up-projection has rank d_n, so the PCA at d_n is exact)."""
    from gqla_megatron.conversion import mla_to_gqla as m2g

    cfg = gqla_cfg(24)
    mw = _model(cfg).to(torch.float64)
    out = str(tmp_path / "ds")
    hf.save_hf_gqla(out, mw, cfg, layout="deepseek_v3", rope_interleave=rope_interleave)
    mla, mcfg, _ = hf.load_hf_mla(out, dtype=torch.float64)
    assert mcfg.num_query_groups == mcfg.num_attention_heads == 6
    assert mcfg == dataclasses.replace(cfg, num_query_groups=6)
    tokens = torch.randint(0, 80, (2, 11), generator=torch.Generator().manual_seed(4))
    expected = rm.forward(tokens, mw, cfg)
    assert compare(rm.forward(tokens, mla, mcfg), expected)["rel_l2"] < 1e-12
    back, bcfg, rep = m2g.convert_mla_model(mla, mcfg, num_query_groups=2,
                                            calib_tokens=tokens.repeat(2, 1))
    assert bcfg == cfg and min(rep.layers[0].k_energy) > 1 - 1e-9
    assert compare(rm.forward(tokens, back, bcfg), expected)["rel_l2"] < 1e-12


def test_load_hf_mla_rejects_moe(tmp_path):
    cfg = gqla_cfg(24)
    out = str(tmp_path / "ds")
    hf.save_hf_gqla(out, _model(cfg), cfg, layout="deepseek_v3")
    _edit_config(out, first_k_dense_replace=1)
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        hf.load_hf_mla(out)


def test_mla_to_gqla_cli_regroups_a_deepseek_layout_dir(tmp_path, capsys):
    """gqla-convert mla-to-gqla on a dense DeepSeek-V3-layout dir holding a model that really has
    2 groups: with neighbour groups of that size the CLI's HF gqla output is the same model; bad
    group counts and an existing output exit 2 and write nothing."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from gqla_megatron.conversion import cli

    cfg = gqla_cfg(24)
    mw = _model(cfg)
    src = str(tmp_path / "ds")
    hf.save_hf_gqla(src, mw, cfg, layout="deepseek_v3")
    prefix = str(tmp_path / "calib_text_document")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in np.random.default_rng(0).integers(0, 80, (6, 40)).astype(np.int32):
        b.add_document(torch.from_numpy(doc), [40])
    b.finalize(prefix + ".idx")
    out = str(tmp_path / "gqla")
    argv = ["mla-to-gqla", "--hf", src, "--save", out, "--num-query-groups", "2", "--calib-data", prefix,
            "--calib-samples", "4", "--calib-seq-length", "16", "--format", "hf"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    back, bcfg, _ = hf.load_hf_gqla(out)
    assert bcfg.num_query_groups == 2 and os.path.isfile(os.path.join(out, "conversion_report.json"))
    tokens = torch.randint(0, 80, (2, 11), generator=torch.Generator().manual_seed(4))
    assert_close_report("mla-to-gqla CLI", rm.forward(tokens, back, bcfg), rm.forward(tokens, mw, cfg),
                        rel_l2=FP32_LOGITS)
    assert cli.main(argv) == 2 and "exists" in capsys.readouterr().err
    bad = str(tmp_path / "bad")
    assert cli.main(argv[:3] + ["--save", bad, "--num-query-groups", "4"] + argv[7:]) == 2
    assert "--num-query-groups" in capsys.readouterr().err and not os.path.exists(bad)
