"""CPU tier: Megatron GQA checkpoints -> TransGQLA -> Megatron GQLA checkpoints (megatron_io, cli).

Fixtures are made in the test: a torch_dist checkpoint written by the GQA writer (a real
Megatron GQA GPTModel at TP=1, dist_checkpointing.save), a torch_dist checkpoint with per-layer
keys (plain DCP save), and legacy TP2 x PP2 shards sliced here from a full state dict with the
rules of docs/megatron-notes.md (column-parallel rows, row-parallel columns, SwiGLU fc1 as
[gate_r ; up_r] per rank, vocab rows, local layer numbers per stage), pickled with an args
Namespace and numpy RNG state as Megatron-LM does.

- reader vs Megatron: the Megatron GQA model loaded from the checkpoint gives the same logits as
  the independent float forward (gguf_import.gqa_forward) of what the reader returns;
- permutation safety: every query head, KV group, row and layer carries a distinct signature and
  must come back in place from every format;
- exactness: a GQA model whose RoPE'd key content is rank one across heads (the case where
  GQLA can be lossless, see test_transgqla.py) converted with d_r = d, freqfold 1 and no
  truncation gives the source's logits (fp32 tolerance) from the written GQLA checkpoint, read
  both without Megatron and by a Megatron GQLA model (dist_checkpointing.load at TP=1);
- bad input: exit code 2, one line, nothing written, the source's bytes unchanged.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from gqla_megatron import reference_model as rm  # noqa: E402
from gqla_megatron.conversion import cli  # noqa: E402
from gqla_megatron.conversion import gguf_import as gi  # noqa: E402
from gqla_megatron.conversion import megatron_io as mio  # noqa: E402
from gqla_megatron.testing import FP32_PARITY, compare  # noqa: E402
from gqla_megatron.testing import assert_close_report as _assert_close  # noqa: E402

D, H, G, HD, F, V, LAYERS = 48, 6, 3, 8, 64, 50, 4


def assert_close_report(name, actual, expected, **limits):
    r = _assert_close(name, actual, expected, **limits)
    print(f"{name}: rel_l2 {r['rel_l2']:.2e} max rel {r['rel']:.2e}")
    return r


# ----------------------------------------------------------------------------------------
# synthetic models
# ----------------------------------------------------------------------------------------
def base_cfg(**kw):
    c = dict(hidden_size=D, num_layers=LAYERS, num_attention_heads=H, num_kv_heads=G, head_dim=HD,
             ffn_hidden_size=F, vocab_size=V, rope_base=10000.0, eps=1e-5)
    c.update(kw)
    return gi.GQAModelConfig(**c)


def shared_rope_model(seed=0):
    """float32 GQA model whose key of head j at frequency k is a[j, k] * B[s, k] (rank one
    across heads per frequency): lossless under GQLA with d_r = d, freqfold 1."""
    cfg = base_cfg()
    gen = torch.Generator().manual_seed(seed)

    def n(*s, std=0.2):
        return torch.randn(*s, generator=gen) * std

    layers = []
    for _ in range(cfg.num_layers):
        W_K = torch.einsum("jk,skD->jskD", n(G, HD // 2, std=1.0), n(2, HD // 2, D)).reshape(G * HD, D)
        layers.append(gi.GQALayerWeights(
            attn_norm=1 + n(D, std=0.1), W_Q=n(H * HD, D), W_K=W_K, W_V=n(G * HD, D, std=0.06),
            W_O=n(D, H * HD), mlp_norm=1 + n(D, std=0.1), W_fc1=n(2 * F, D), W_fc2=n(D, F)))
    return gi.GQAModelWeights(embedding=n(V, D, std=1.0), layers=layers, final_norm=1 + n(D, std=0.1),
                              output=n(V, D, std=0.5)), cfg


def signature_model():
    """Every tensor element encodes (tensor, layer, head/group, row, column): value =
    code + layer*1e4 + row*1e1 + col*1e-3 with a per-tensor code; heads/groups are rows."""
    cfg = base_cfg()

    def sig(code, l, rows, cols):
        r = torch.arange(rows, dtype=torch.float64)[:, None]
        c = torch.arange(cols, dtype=torch.float64)[None, :]
        return (code * 1e5 + l * 1e4 + r * 10 + c * 1e-3).float().squeeze(-1) if cols else None

    def vec(code, l, n):
        return (code * 1e5 + l * 1e4 + torch.arange(n, dtype=torch.float64) * 10).float()

    layers = [gi.GQALayerWeights(
        attn_norm=vec(1, l, D), W_Q=sig(2, l, H * HD, D), W_K=sig(3, l, G * HD, D), W_V=sig(4, l, G * HD, D),
        W_O=sig(5, l, D, H * HD), mlp_norm=vec(6, l, D), W_fc1=sig(7, l, 2 * F, D), W_fc2=sig(8, l, D, F))
        for l in range(cfg.num_layers)]
    return gi.GQAModelWeights(embedding=sig(9, 0, V, D), layers=layers, final_norm=vec(10, 0, D),
                              output=sig(11, 0, V, D)), cfg


def assert_same_weights(a: gi.GQAModelWeights, b: gi.GQAModelWeights):
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.output, b.output)
    assert torch.equal(a.final_norm, b.final_norm)
    for l, (x, y) in enumerate(zip(a.layers, b.layers)):
        for f in dataclasses.fields(gi.GQALayerWeights):
            assert torch.equal(getattr(x, f.name), getattr(y, f.name)), f"layer {l} {f.name}"


# ----------------------------------------------------------------------------------------
# checkpoint fixtures
# ----------------------------------------------------------------------------------------
def megatron_lm_args(cfg, tp, pp):
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, group_query_attention=True,
        num_query_groups=cfg.num_kv_heads, kv_channels=cfg.head_dim, padded_vocab_size=cfg.vocab_size,
        rotary_base=int(cfg.rope_base), norm_epsilon=cfg.eps, normalization="RMSNorm", swiglu=True,
        add_bias_linear=False, position_embedding_type="rope", rotary_percent=1.0,
        untie_embeddings_and_output_weights=True, multi_latent_attention=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=torch.float32)


def write_legacy(root, w, cfg, tp=2, pp=2, iteration=5):
    """Megatron-LM legacy shards of a full GQA model (see module doc for the slicing rules)."""
    full = mio.gqa_state_dict(w, cfg)
    it = os.path.join(root, f"iter_{iteration:07d}")
    per_stage = cfg.num_layers // pp
    for p in range(pp):
        for t in range(tp):
            sd = {}
            for k, v in full.items():
                if k.startswith("decoder.layers."):
                    l, rest = k[len("decoder.layers."):].split(".", 1)
                    if int(l) // per_stage != p:
                        continue
                    k = f"decoder.layers.{int(l) - p * per_stage}.{rest}"
                elif k == mio.EMBEDDING and p != 0 or k in (mio.OUTPUT, mio.FINAL_NORM) and p != pp - 1:
                    continue
                if k.endswith("linear_fc1.weight"):
                    gate, up = v.chunk(2, 0)
                    v = torch.cat([gate.chunk(tp, 0)[t], up.chunk(tp, 0)[t]], 0)
                elif k.endswith(("linear_qkv.weight",)) or k in (mio.EMBEDDING, mio.OUTPUT):
                    v = v.chunk(tp, 0)[t]
                elif k.endswith(("linear_proj.weight", "linear_fc2.weight")):
                    v = v.chunk(tp, 1)[t]
                sd[k] = v.clone()
            d = os.path.join(it, f"mp_rank_{t:02d}_{p:03d}")
            os.makedirs(d)
            torch.save({"args": megatron_lm_args(cfg, tp, pp), "checkpoint_version": 3.0, "iteration": iteration,
                        "model": sd, "rng_state": [{"random_rng_state": random.getstate(),
                                                    "np_rng_state": np.random.get_state(),
                                                    "torch_rng_state": torch.get_rng_state()}]},
                       os.path.join(d, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return root


def write_per_layer_dcp(root, w, cfg):
    """torch_dist with per-layer keys (decoder.layers.<i>.*, TE norm names), Megatron-LM style
    args in common.pt."""
    import torch.distributed.checkpoint as dcp

    sd = {}
    for k, v in mio.gqa_state_dict(w, cfg).items():
        k = k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        k = k.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        sd[k] = v.clone()
    it = os.path.join(root, "iter_0000001")
    os.makedirs(it)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(it), no_dist=True)
    torch.save({"args": megatron_lm_args(cfg, 1, 1)}, os.path.join(it, "common.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
    return root


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    exact_w, cfg = shared_rope_model()
    sig_w, _ = signature_model()
    out = {"exact_w": exact_w, "sig_w": sig_w, "cfg": cfg}
    out["exact_dist"] = mio.save_gqa_checkpoint(exact_w, cfg, str(base / "exact_dist"), seq_length=64)
    out["sig_dist"] = mio.save_gqa_checkpoint(sig_w, cfg, str(base / "sig_dist"), seq_length=64)
    out["exact_legacy"] = write_legacy(str(base / "exact_legacy"), exact_w, cfg)
    out["sig_legacy"] = write_legacy(str(base / "sig_legacy"), sig_w, cfg)
    out["sig_layers"] = write_per_layer_dcp(str(base / "sig_layers"), sig_w, cfg)
    return out


def tree_hash(root):
    h = hashlib.sha256()
    for d, _dirs, files in sorted(os.walk(root)):
        for f in sorted(files):
            p = os.path.join(d, f)
            h.update(os.path.relpath(p, root).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def causal_mask(S):
    """Megatron's mask convention (True = masked); passed explicitly because the local spec's
    default causal mask is built on device 'cuda'."""
    return torch.ones(S, S, dtype=torch.bool).triu(1)[None, None]


def tokens(n=2, s=12, seed=3):
    return torch.randint(0, V, (n, s), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------
def test_qkv_layout_is_group_major():
    w, cfg = signature_model()
    lw = w.layers[1]
    qkv = mio.pack_qkv(lw.W_Q, lw.W_K, lw.W_V, H, G)
    m = H // G
    for j in range(G):
        base = j * (m + 2) * HD
        for i in range(m):
            assert torch.equal(qkv[base + i * HD: base + (i + 1) * HD], lw.W_Q[(j * m + i) * HD:(j * m + i + 1) * HD])
        assert torch.equal(qkv[base + m * HD: base + (m + 1) * HD], lw.W_K[j * HD:(j + 1) * HD])
        assert torch.equal(qkv[base + (m + 1) * HD: base + (m + 2) * HD], lw.W_V[j * HD:(j + 1) * HD])
    q, k, v = mio.unpack_qkv(qkv, H, G, HD)
    assert torch.equal(q, lw.W_Q) and torch.equal(k, lw.W_K) and torch.equal(v, lw.W_V)


@pytest.mark.parametrize("fmt", ["sig_dist", "sig_legacy", "sig_layers"])
def test_every_format_returns_every_signature_in_place(ckpts, fmt):
    src = mio.open_gqa_source(ckpts[fmt])
    assert src.cfg == dataclasses.replace(ckpts["cfg"], context_length=src.cfg.context_length)
    assert not src.tied_output
    assert_same_weights(src.read_all(), ckpts["sig_w"])


def test_layer_streaming_reads_one_layer_and_each_tensor_once(ckpts):
    src = mio.open_gqa_source(ckpts["sig_dist"])
    lw = src.read_layer(2)
    assert torch.equal(lw.W_K, ckpts["sig_w"].layers[2].W_K)
    with pytest.raises(ValueError, match="read twice"):
        src.read_layer(2)
    with pytest.raises(ValueError, match="never read"):
        src.finish()


def test_reader_matches_the_megatron_gqa_model(ckpts):
    """The Megatron GQA GPTModel loaded from the checkpoint (dist_checkpointing) computes the
    same logits as the independent float forward of the reader's weights."""
    from megatron.core import dist_checkpointing

    from gqla_megatron.testing import model_parallel
    from gqla_megatron.training.models import build_model, transformer_config

    w, cfg = mio.read_gqa_checkpoint(ckpts["exact_dist"])
    tok = tokens()
    expected = gi.gqa_forward(tok, w, cfg)
    with model_parallel(1, 1):
        common = mio._megatron_common(LAYERS, D, F, H, torch.float32, 1e-5)
        model = build_model("gqa", transformer_config("gqa", common, dict(num_query_groups=G, qk_head_dim=HD)),
                            vocab_size=V, seq_length=64, backend="local")
        sd = model.sharded_state_dict()
        model.load_state_dict(dist_checkpointing.load(sd, os.path.join(ckpts["exact_dist"], "iter_0000000")))
        with torch.no_grad():
            got = model(tok, torch.arange(tok.shape[1])[None].expand_as(tok), causal_mask(tok.shape[1]))
    assert_close_report("megatron gqa vs reader+gqa_forward", got, expected, rel_l2=FP32_PARITY)
    w2, _ = mio.read_gqa_checkpoint(ckpts["exact_legacy"])
    assert_same_weights(w2, w)


# ----------------------------------------------------------------------------------------
# exact conversion through checkpoints
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,rank", [("exact_dist", None), ("exact_legacy", 2 * G * HD - HD)])
def test_lossless_conversion_keeps_the_logits(ckpts, tmp_path, fmt, rank):
    w, cfg = ckpts["exact_w"], ckpts["cfg"]
    src = mio.open_gqa_source(ckpts[fmt])
    calib = tokens(6, 16, seed=5)
    ev = tokens(2, 16, seed=9)
    out = str(tmp_path / "gqla")
    rep = mio.convert_checkpoint(src, mio.ConvertOptions(kv_lora_rank=rank, rope_dim=HD, freqfold=1),
                                 out, calib_tokens=calib, eval_tokens=ev)
    mw, gcfg, args = mio.read_gqla_checkpoint(out)
    assert args["attention"] == "gqla" and args["qk_layernorm"] is False and gcfg.num_query_groups == G
    tok = tokens()
    src_logits = gi.gqa_forward(tok, w, cfg)
    assert_close_report(f"{fmt} r={rank}: converted vs source logits", rm.forward(tok, mw, gcfg), src_logits,
                        rel_l2=4 * FP32_PARITY)
    p = rep["perplexity"]
    assert abs(p["converted"] / p["source"] - 1) < 1e-4, p
    assert all(l["rope_energy"] > 1 - 1e-6 and abs(l["kv_energy"] - 1) < 1e-6 for l in rep["layers"])
    for name in ("gqla_config.json", "conversion_report.json", "conversion_report.md",
                 "latest_checkpointed_iteration.txt", "iter_0000000/gqla_train_state.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_precomputed_statistics_path_and_hessian_weighting(ckpts, calib_prefix, tmp_path, capsys):
    """convert_checkpoint with precomputed plain statistics (collect_attention_stats on the whole
    model) writes the same weights as the streamed statistics; Hessian-weighted ones change the
    lossy result; the CLI flag runs end to end and records the setting."""
    from gqla_megatron.conversion import transgqla as tg

    w, cfg = ckpts["exact_w"], ckpts["cfg"]
    calib = tokens(4, 16, seed=3)
    opts = mio.ConvertOptions(kv_lora_rank=12, rope_dim=4, freqfold=2)
    outs = {}
    for name, stats in (("streamed", None),
                        ("plain", tg.collect_attention_stats(w, cfg, calib, batch=2)),
                        ("hessian", tg.collect_attention_stats(w, cfg, calib, batch=2, hessian_weighting=True))):
        out = str(tmp_path / name)
        mio.convert_checkpoint(mio.open_gqa_source(ckpts["exact_dist"]), opts, out, calib_tokens=calib, stats=stats)
        outs[name] = mio.read_gqla_checkpoint(out)[0]
    a, b, c = (outs[k].layers[1].attn.W_UKV for k in ("streamed", "plain", "hessian"))
    assert compare(b, a)["rel_l2"] < 1e-5 and compare(c, a)["rel_l2"] > 1e-3
    out = str(tmp_path / "cli")
    rc, err = run_cli(["gqa-to-gqla", "--load", ckpts["exact_dist"], "--save", out, "--kv-lora-rank", "12",
                       "--qk-pos-emb-head-dim", "4", "--freqfold", "2", "--calib-data", calib_prefix,
                       "--calib-samples", "4", "--calib-seq-length", "16", "--hessian-weighting",
                       "--no-progress"], capsys)
    assert rc == 0, err
    assert json.load(open(os.path.join(out, "conversion_report.json")))["settings"]["hessian_weighting"] is True


def test_lossy_conversion_reports_retained_energy(ckpts, tmp_path):
    src = mio.open_gqa_source(ckpts["exact_dist"])
    rep = mio.convert_checkpoint(src, mio.ConvertOptions(kv_lora_rank=12, rope_dim=4, freqfold=2),
                                 str(tmp_path / "o"), calib_tokens=tokens(4, 16))
    assert rep["settings"]["kv_lora_rank"] == 12 and rep["cache_values_per_token_per_layer"]["gqla_absorb"] == 16
    assert all(0 < l["kv_energy"] < 1 for l in rep["layers"])


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def make_calib(prefix, vocab):
    """Megatron indexed dataset of random tokens (no tokenizer needed)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    gen = np.random.default_rng(0)
    for _ in range(8):
        b.add_document(torch.from_numpy(gen.integers(0, vocab, 40).astype(np.int32)), [40])
    b.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def calib_prefix(tmp_path_factory):
    return make_calib(str(tmp_path_factory.mktemp("data") / "rand_text_document"), V)


def run_cli(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def test_cli_end_to_end_and_megatron_gqla_loads_it(ckpts, calib_prefix, tmp_path, capsys):
    from megatron.core import dist_checkpointing

    from gqla_megatron.megatron import build_gqla_gpt_model
    from gqla_megatron.testing import model_parallel

    out = str(tmp_path / "gqla")
    before = tree_hash(ckpts["exact_legacy"])
    rc, err = run_cli(["gqa-to-gqla", "--load", ckpts["exact_legacy"], "--save", out, "--kv-lora-rank", "none",
                       "--qk-pos-emb-head-dim", str(HD), "--calib-data", calib_prefix, "--calib-samples", "6",
                       "--calib-seq-length", "16", "--target-tensor-model-parallel-size", "3",
                       "--no-progress"], capsys)
    assert rc == 0, err
    assert tree_hash(ckpts["exact_legacy"]) == before
    state = json.load(open(os.path.join(out, "iter_0000000", "gqla_train_state.json")))
    assert state["args"]["tensor_model_parallel_size"] == 3 and state["model_only"]
    cfg_json = json.load(open(os.path.join(out, "gqla_config.json")))
    mw, gcfg, _ = mio.read_gqla_checkpoint(out)
    assert cfg_json["gqla_config"] == gcfg.to_dict()
    tok = tokens()
    expected = rm.forward(tok, mw, gcfg)
    assert_close_report("converted vs source", expected, gi.gqa_forward(tok, ckpts["exact_w"], ckpts["cfg"]),
                        rel_l2=4 * FP32_PARITY)
    # the converted model's Megatron config: the source's shape, no latent norms, RoPE base 1e4
    assert (gcfg.hidden_size, gcfg.num_attention_heads) == (D, H) and not gcfg.qk_layernorm
    assert gcfg.megatron_shape() == dict(num_query_groups=G, kv_lora_rank=gcfg.kv_lora_rank, q_lora_rank=None,
                                         qk_head_dim=HD, qk_pos_emb_head_dim=HD, v_head_dim=HD)
    assert gcfg.rotary_base == 10000.0
    with model_parallel(1, 1):
        config = mio.gqla_megatron_config(gcfg, num_layers=LAYERS, ffn_hidden_size=F, dtype=torch.float32,
                                          eps=1e-5)
        model = build_gqla_gpt_model(config, vocab_size=V, max_sequence_length=64)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), os.path.join(out, "iter_0000000")))
        with torch.no_grad():
            got = model(tok, torch.arange(tok.shape[1])[None].expand_as(tok), None)
    assert_close_report("megatron gqla (loaded) vs reference", got, expected, rel_l2=FP32_PARITY)
    # gqla-serve's loader reads the converted checkpoint (no optimizer state, no latent norms)
    from gqla_megatron.inference.engine import GQLAEngine, SamplingParams
    from gqla_megatron.inference.loader import load_megatron_checkpoint

    smw, scfg, _ = load_megatron_checkpoint(out)
    assert scfg.to_dict() == gcfg.to_dict()
    assert_close_report("serve loader vs reference", rm.forward(tok, smw, scfg), expected, rel_l2=FP32_PARITY)
    toks = {p: GQLAEngine(smw, scfg, decode_path=p, max_batch=1, max_seq_len=32).generate(
        [tok[0, :5].tolist()], SamplingParams(max_new_tokens=6))[0].tokens for p in ("absorb", "gqa")}
    assert toks["absorb"] == toks["gqa"] and len(toks["gqa"]) == 6


def _truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _bad_sources(ckpts, tmp):
    """name -> (source dir, expected message fragment)."""
    out = {}
    t = os.path.join(tmp, "trunc_dist")
    shutil.copytree(ckpts["sig_dist"], t)
    _truncate(os.path.join(t, "iter_0000000", "__0_1.distcp"))
    out["truncated distcp"] = (t, "truncated")
    t = os.path.join(tmp, "trunc_legacy")
    shutil.copytree(ckpts["sig_legacy"], t)
    _truncate(os.path.join(t, "iter_0000005", "mp_rank_01_001", "model_optim_rng.pt"))
    out["truncated shard"] = (t, "mp_rank_01_001")
    t = os.path.join(tmp, "missing_key")
    shutil.copytree(ckpts["sig_legacy"], t)
    for r in ("00", "01"):
        p = os.path.join(t, "iter_0000005", f"mp_rank_{r}_001", "model_optim_rng.pt")
        obj = torch.load(p, weights_only=False)
        del obj["model"]["decoder.layers.1.mlp.linear_fc2.weight"]
        torch.save(obj, p)
    out["missing key"] = (t, "decoder.layers.3.mlp.linear_fc2.weight")
    t = os.path.join(tmp, "no_args")
    shutil.copytree(ckpts["sig_dist"], t)
    os.remove(os.path.join(t, "iter_0000000", "gqla_train_state.json"))
    os.remove(os.path.join(t, "iter_0000000", "common.pt"))
    out["no config"] = (t, "no model config")
    return out


def test_bad_inputs_exit_2_write_nothing_and_leave_the_source(ckpts, calib_prefix, tmp_path, capsys):
    good = ["--kv-lora-rank", "8", "--qk-pos-emb-head-dim", "4", "--freqfold", "2", "--calib-data", calib_prefix,
            "--calib-samples", "2", "--calib-seq-length", "16", "--no-progress"]
    src = ckpts["sig_dist"]
    cases = [(["--load", src, "--kv-lora-rank", str(2 * G * HD - 4 + 1)], "--kv-lora-rank"),
             (["--load", src, "--qk-pos-emb-head-dim", "3"], "even"),
             (["--load", src, "--qk-pos-emb-head-dim", "16"], "divide the source head dim"),
             (["--load", src, "--freqfold", "3"], "--freqfold"),
             (["--load", src, "--qk-pos-emb-head-dim", "2", "--freqfold", "2"], "multiple of head_dim/d_r"),
             (["--load", src, "--target-tensor-model-parallel-size", "2"], "divide the KV groups"),
             (["--load", src, "--target-pipeline-model-parallel-size", "3"], "divide the layers"),
             (["--load", src, "--calib-data", str(tmp_path / "nope")], "neither a text file"),
             (["--load", str(tmp_path / "nothing")], "no such checkpoint")]
    for name, (path, msg) in _bad_sources(ckpts, str(tmp_path)).items():
        cases.append((["--load", path], msg))
    gqla_src = str(tmp_path / "a_gqla")
    mio.convert_checkpoint(mio.open_gqa_source(src), mio.ConvertOptions(kv_lora_rank=8, rope_dim=4, freqfold=2),
                           gqla_src, calib_tokens=tokens(2, 16))
    cases.append((["--load", gqla_src], "GQLA"))
    hashes = {p: tree_hash(p) for p in (src, ckpts["sig_legacy"], gqla_src)}
    for extra, msg in cases:
        out = str(tmp_path / "out")
        argv = ["gqa-to-gqla", *good, "--save", out, *extra]
        rc, err = run_cli(argv, capsys)
        assert rc == 2, (extra, err)
        assert msg in err and err.count("\n") == 1 and err.startswith("gqla-convert: error:"), (extra, err)
        assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if p.startswith("out")]
    os.makedirs(tmp_path / "exists")
    rc, err = run_cli(["gqa-to-gqla", *good, "--load", src, "--save", str(tmp_path / "exists")], capsys)
    assert rc == 2 and "exists" in err and os.listdir(tmp_path / "exists") == []
    assert {p: tree_hash(p) for p in hashes} == hashes


def test_import_gguf_then_convert_then_export_hf(tmp_path, capsys):
    """import-gguf writes a GQA checkpoint whose weights are the GGUF's (exactly); the
    converted checkpoint exports to HF (gqla layout) and reads back with the same logits."""
    pytest.importorskip("gguf")
    pytest.importorskip("safetensors")
    from test_gguf_import import TINY, tiny_hf_tensors, write_tiny_gguf

    from gqla_megatron.conversion import hf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_hf_tensors(tied=False))
    rc, err = run_cli(["import-gguf", "--gguf", str(path), "--save", str(tmp_path / "gqa")], capsys)
    assert rc == 0, err
    w_gguf, cfg_gguf, _ = gi.load_gguf_model(str(path))
    src = mio.open_gqa_source(str(tmp_path / "gqa"))
    assert src.cfg == cfg_gguf
    assert_same_weights(src.read_all(), w_gguf)
    d = TINY["D"] // TINY["H"]
    calib_prefix = make_calib(str(tmp_path / "calib_text_document"), TINY["V"])
    rc, err = run_cli(["gqa-to-gqla", "--gguf", str(path), "--save", str(tmp_path / "gqla"), "--kv-lora-rank", "12",
                       "--qk-pos-emb-head-dim", str(d), "--freqfold", "1", "--calib-data", calib_prefix,
                       "--calib-samples", "2", "--calib-seq-length", "16", "--no-progress"], capsys)
    assert rc == 0, err
    rc, err = run_cli(["export-hf", "--load", str(tmp_path / "gqla"), "--save", str(tmp_path / "hf")], capsys)
    assert rc == 0, err
    mw, gcfg, _ = mio.read_gqla_checkpoint(str(tmp_path / "gqla"))
    mw2, gcfg2, _ = hf.load_hf_gqla(str(tmp_path / "hf"))
    tok = torch.randint(0, TINY["V"], (2, 10), generator=torch.Generator().manual_seed(1))
    assert_close_report("export-hf round trip", rm.forward(tok, mw2.to(torch.float32), gcfg2),
                        rm.forward(tok, mw, gcfg), rel_l2=FP32_PARITY)


def test_mla_to_gqla_from_a_megatron_mla_checkpoint(calib_prefix, tmp_path, capsys):
    """gqla-pretrain --attention mla (Megatron's MLASelfAttention) -> read as GQLA with g = h_q
    (checked against the Megatron MLA model's logits) -> gqla-convert mla-to-gqla --load at full
    rank into 4 groups: the same logits."""
    import subprocess
    import sys

    from megatron.core import dist_checkpointing

    from gqla_megatron.conversion import hf
    from gqla_megatron.testing import model_parallel
    from gqla_megatron.training.models import build_model, transformer_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    src = str(tmp_path / "mla")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, os.path.join(root, "pretrain", "pretrain_gqla.py"), "--recipe", "tiny_cpu",
                        "--mock-data", "--attention", "mla", "--train-iters", "3", "--save", src,
                        "--save-interval", "3"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    mw, cfg, args = mio.read_gqla_checkpoint(src, allow_mla=True)
    assert args["attention"] == "mla" and cfg.num_query_groups == cfg.num_attention_heads == 8
    tok = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = rm.forward(tok, mw, cfg)
    with model_parallel(1, 1):
        common = mio._megatron_common(2, 64, 128, 8, torch.float32, 1e-5)
        config = transformer_config("mla", common, dict(num_query_groups=4, kv_lora_rank=32, q_lora_rank=None,
                                                        qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16))
        model = build_model("mla", config, vocab_size=256, seq_length=64, backend="local")
        ckpt = os.path.join(src, "iter_0000003")
        model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)["model"])
        with torch.no_grad():
            got = model(tok, torch.arange(tok.shape[1])[None].expand_as(tok), None)
    _assert_close("Megatron MLA vs MLA read as GQLA (g = h_q)", got, expected, rel_l2=FP32_PARITY)
    for fmt in ("megatron", "hf"):
        out = str(tmp_path / f"gqla4_{fmt}")
        rc, err = run_cli(["mla-to-gqla", "--load", src, "--save", out, "--num-query-groups", "4", "--qk-head-dim",
                           "32", "--v-head-dim", "32", "--calib-data", calib_prefix, "--calib-samples", "4",
                           "--calib-seq-length", "16", "--format", fmt], capsys)
        assert rc == 0, err
        gmw, gcfg = (mio.read_gqla_checkpoint(out) if fmt == "megatron" else hf.load_hf_gqla(out))[:2]
        assert gcfg.num_query_groups == 4
        _assert_close(f"mla-to-gqla --load --format {fmt} (full rank) vs MLA", rm.forward(tok, gmw, gcfg),
                      expected, rel_l2=1e-5)
        if fmt == "megatron":  # gqla-serve's loader reads it too
            from gqla_megatron.inference.loader import load_checkpoint

            smw, scfg, _, _ = load_checkpoint(out)
            _assert_close("serve loader on the mla-to-gqla output", rm.forward(tok, smw, scfg), expected,
                          rel_l2=1e-5)
