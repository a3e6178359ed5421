"""GPU tier (one CUDA GPU, Transformer Engine): the TE spec against the reference, the TE spec's
gradients against the local spec's, bf16, and FP8 (hybrid, delayed scaling).

Run on the H200 device (see benchmarks/gpu_tier_h200.md for the exact command):
    source .devkit/setup.sh && GQLA_RESULTS=$OUT/gpu_tier.json python3 -m pytest -q -m gpu tests/gpu
Measured figures are appended to $GQLA_RESULTS (JSON lines) when it is set.
"""

import json
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

megatron = pytest.importorskip("megatron.core")

from gqla_megatron import reference_model as refm  # noqa: E402
from gqla_megatron.megatron import adapters, build_gqla_gpt_model, tiny_config  # noqa: E402
from gqla_megatron.testing import assert_close_report, compare, model_parallel  # noqa: E402

VOCAB, SEQ, BATCH = 256, 64, 2
# TE's fp32 GEMMs use cuBLAS's fast-TF32 compute type whatever torch.backends says; this turns
# TF32 off for the process (it must be set before CUDA initialises; the command sets it too).
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")


def record(name, **values):
    path = os.environ.get("GQLA_RESULTS")
    print(name, values)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **values}) + "\n")


def te_or_skip():
    from gqla_megatron.megatron.spec import te_available

    if not te_available():
        pytest.skip("Transformer Engine is not importable")


def fp8_shapes(**kw):
    """Tiny shapes whose every GEMM dim is a multiple of 16 (FP8-legal)."""
    base = dict(hidden_size=128, ffn_hidden_size=256, num_attention_heads=8, num_query_groups=4,
                kv_lora_rank=64, q_lora_rank=64, qk_head_dim=32, qk_pos_emb_head_dim=32,
                v_head_dim=32, num_layers=2, use_cpu_initialization=True)
    base.update(kw)
    return tiny_config(**base)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).cuda()
    return tok, torch.arange(SEQ, device="cuda")[None].expand(BATCH, SEQ), torch.roll(tok, -1, 1)


def build(cfg, backend, seed=1):
    torch.manual_seed(seed)
    return build_gqla_gpt_model(cfg, vocab_size=VOCAB, max_sequence_length=128, backend=backend).cuda()


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_te_spec_fp32_matches_reference():
    te_or_skip()
    with model_parallel(1, 1):
        cfg = fp8_shapes()
        model = build(cfg, "te")
        tok, pos, _ = data()
        with torch.no_grad():
            logits = model(tok, pos, None)
        mw = adapters.model_to_reference(dict(model.named_parameters()), cfg.gqla, cfg.num_layers, backend="te")
        expected = refm.forward(tok, mw.to(torch.float64), cfg.gqla)
        r = assert_close_report("TE fp32 logits", logits, expected, rel_l2=1e-5)
        record("te_fp32_vs_reference_fp64", **r)


def test_te_spec_gradients_match_local_spec():
    te_or_skip()
    with model_parallel(1, 1):
        cfg = fp8_shapes()
        te_model, local_model = build(cfg, "te"), build(cfg, "local", seed=2)
        g = cfg.gqla
        te_sd = dict(te_model.named_parameters())
        mw = adapters.model_to_reference(te_sd, g, cfg.num_layers, backend="te")
        local_sd = {}
        for i, lw in enumerate(mw.layers):
            local_sd.update(adapters.layer_from_reference(lw, f"decoder.layers.{i}.", g, backend="local"))
        for k in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"):
            local_sd[k] = te_sd[k]
        with torch.no_grad():
            for n, p in local_model.named_parameters():
                p.copy_(local_sd[n])
        tok, pos, labels = data()
        for m in (te_model, local_model):
            m(tok, pos, None, labels=labels).mean().backward()
        te_grads = {n: p.grad for n, p in te_model.named_parameters()}
        te_mw = adapters.model_to_reference(te_grads, g, cfg.num_layers, backend="te")
        worst = 0.0
        for i, lw in enumerate(te_mw.layers):
            as_local = adapters.layer_from_reference(lw, f"decoder.layers.{i}.", g, backend="local")
            for n, grad in as_local.items():
                r = assert_close_report(f"grad {n}", grad, dict(local_model.named_parameters())[n].grad,
                                        rel_l2=1e-5)
                worst = max(worst, r["rel_l2"])
        record("te_vs_local_grads_fp32", worst_rel_l2=worst)


def _bf16_model(fp8=None):
    cfg = fp8_shapes(bf16=True, params_dtype=torch.bfloat16, fp8=fp8,
                     fp8_recipe="delayed" if fp8 else None, fp8_amax_history_len=16 if fp8 else 1,
                     fp8_amax_compute_algo="max" if fp8 else "most_recent")
    return cfg, build(cfg, "te")


def test_te_spec_bf16_matches_reference():
    te_or_skip()
    with model_parallel(1, 1):
        cfg, model = _bf16_model()
        tok, pos, labels = data()
        with torch.no_grad():
            logits = model(tok, pos, None)
        mw = adapters.model_to_reference(dict(model.named_parameters()), cfg.gqla, cfg.num_layers, backend="te")
        expected = refm.forward(tok, mw.to(torch.float32), cfg.gqla)
        r = assert_close_report("TE bf16 logits", logits, expected, cos=0.9999, rel_l2=2e-2)
        loss = model(tok, pos, None, labels=labels).mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        record("te_bf16_vs_reference_fp32", **r)


def test_fp8_hybrid_delayed_forward_backward():
    te_or_skip()
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9 (Ada/Hopper)")
    with model_parallel(1, 1):
        _, bf16_model = _bf16_model()
        cfg8, fp8_model = _bf16_model(fp8="hybrid")
        with torch.no_grad():  # same weights
            src = dict(bf16_model.named_parameters())
            for n, p in fp8_model.named_parameters():
                p.copy_(src[n])
        tok, pos, labels = data()
        for step in range(4):  # delayed scaling: let the amax history fill
            fp8_model.zero_grad()
            loss8 = fp8_model(tok, pos, None, labels=labels).mean()
            loss8.backward()
            grads_ok = all(torch.isfinite(p.grad).all() for p in fp8_model.parameters() if p.grad is not None)
            assert torch.isfinite(loss8) and grads_ok, f"non-finite at step {step}"
        with torch.no_grad():
            out8, out16 = fp8_model(tok, pos, None), bf16_model(tok, pos, None)
        r = compare(out8, out16)
        loss16 = bf16_model(tok, pos, None, labels=labels).mean()
        record("fp8_hybrid_delayed_vs_bf16_logits", cos=r["cos"], rel_l2=r["rel_l2"],
               loss_fp8=loss8.item(), loss_bf16=loss16.item())
        assert r["cos"] > 0.99, r
