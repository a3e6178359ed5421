"""CPU tier: the decode engine on both paths against the reference full forward."""

import os
import subprocess
import sys

import pytest
import torch

from gqla_megatron import reference_model as refm
from gqla_megatron.config import GQLAConfig
from gqla_megatron.inference.backends import select_backend
from gqla_megatron.inference.engine import GQLAEngine, SamplingParams
from gqla_megatron.roofline import get_device
from gqla_megatron.testing import random_model_weights

CFG = GQLAConfig(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_lora_rank=32,
                 qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, q_lora_rank=24)
H100 = get_device("H100")  # a fixed device spec: no probe, deterministic choice


def model(cfg=CFG, vocab=100, layers=2, seed=0):
    return random_model_weights(cfg, vocab=vocab, layers=layers, seed=seed)


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [7, 8], [9, 10, 11, 12]]


@pytest.mark.parametrize("path", ["absorb", "gqa"])
def test_ragged_batch_matches_full_forward_over_40_steps(path):
    mw = model()
    eng = GQLAEngine(mw, CFG, decode_path=path, max_batch=3, max_seq_len=64, device_spec=H100)
    assert eng.path == path and eng.backend.path == path
    res = eng.generate(PROMPTS, SamplingParams(max_new_tokens=40))
    for p, r in zip(PROMPTS, res):
        assert r.error is None and len(r.tokens) == 40
        seq = torch.tensor(p + r.tokens)
        full = refm.forward(seq[None], mw, CFG)[0, len(p) - 1:-1]
        assert (full - r.logits).abs().max() <= 1e-5
        assert torch.equal(full.argmax(-1), torch.tensor(r.tokens))


def test_both_paths_same_tokens_and_switch_mid_generation():
    mw = model(seed=1)
    outs = {}
    for path in ("absorb", "gqa"):
        eng = GQLAEngine(mw, CFG, decode_path=path, max_batch=3, max_seq_len=64, device_spec=H100)
        outs[path] = eng.generate(PROMPTS, SamplingParams(max_new_tokens=32))
        other = "gqa" if path == "absorb" else "absorb"
        switched = eng.generate(PROMPTS, SamplingParams(max_new_tokens=32), switch_at=10, switch_to=other)
        assert eng.path == other
        for a, b in zip(outs[path], switched):
            assert a.tokens == b.tokens and (a.logits - b.logits).abs().max() <= 1e-4
    for a, b in zip(outs["absorb"], outs["gqa"]):
        assert a.tokens == b.tokens and (a.logits - b.logits).abs().max() <= 1e-5


def test_switch_to_absorb_refused_when_rank_deficient():
    cfg = GQLAConfig(hidden_size=32, num_attention_heads=2, num_query_groups=1, kv_lora_rank=24,
                     qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8)
    eng = GQLAEngine(model(cfg), cfg, decode_path="gqa", max_batch=1, max_seq_len=16, device_spec=H100)
    with pytest.raises(ValueError, match="rank-deficient"):
        eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4), switch_at=1, switch_to="absorb")


def test_auto_uses_the_cost_model_and_reports_both_paths():
    eng = GQLAEngine(model(), CFG, decode_path="auto", max_batch=2, max_seq_len=64, device_spec=H100)
    assert eng.decision.requested == "auto" and eng.decision.path in ("absorb", "gqa")
    assert eng.decision.absorb is not None and eng.decision.gqa is not None
    assert "absorb" in eng.decision.summary() and "gqa" in eng.decision.summary()


def test_bad_requests_do_not_kill_the_batch_and_bad_options_raise():
    eng = GQLAEngine(model(), CFG, decode_path="absorb", max_batch=4, max_seq_len=16, device_spec=H100)
    res = eng.generate([[1, 2], [], list(range(1, 16)), [500]], SamplingParams(max_new_tokens=4))
    assert res[0].error is None and len(res[0].tokens) == 4
    assert res[1].error == "empty prompt"
    assert "exceeds the maximum context 16" in res[2].error
    assert "outside the vocabulary" in res[3].error
    with pytest.raises(ValueError, match="decode_path must be"):
        GQLAEngine(model(), CFG, decode_path="mla", device_spec=H100)
    with pytest.raises(ValueError, match="serves the gqa path"):
        select_backend("absorb", CFG, torch.device("cpu"), torch.float32, requested="torch_gqa")
    with pytest.raises(ValueError, match="unknown decode backend"):
        select_backend("absorb", CFG, torch.device("cpu"), torch.float32, requested="flashmla")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_sampling_seeded_and_stop_tokens():
    eng = GQLAEngine(model(), CFG, decode_path="gqa", max_batch=3, max_seq_len=64, device_spec=H100)
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    a, b = eng.generate(PROMPTS, p), eng.generate(PROMPTS, p)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    greedy = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    tiny_p = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-6))
    assert [r.tokens for r in tiny_p] == [r.tokens for r in greedy]
    stop = greedy[0].tokens[3]
    stopped = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, stop_tokens=(stop,)))
    first = greedy[0].tokens.index(stop)
    assert stopped[0].tokens == greedy[0].tokens[:first + 1]


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_serve_cli_on_a_pretrained_checkpoint(tmp_path):
    pytest.importorskip("megatron.core")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    ckpt = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain", "pretrain_gqla.py"), "--recipe", "tiny_cpu",
                        "--mock-data", "--train-iters", "30", "--save", str(ckpt), "--save-interval", "30"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    outs = {}
    for path in ("absorb", "gqa"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "serve", "generate.py"), "generate", "--load", str(ckpt),
                            "--prompt-ids", "10 11 12 13", "--prompt-ids", "40 41", "--prompt-ids", "",
                            "--decode-path", path, "--max-new-tokens", "6"],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"chosen: {path}" in r.stdout and "KV-cache bytes per token" in r.stdout
        outs[path] = [l for l in r.stdout.splitlines() if l.startswith("[")]
    assert outs["absorb"] == outs["gqa"]
    assert outs["absorb"][2] == "[2] error: empty prompt"
    # the tiny model learned Megatron's mock data (each token = previous + 1)
    assert outs["absorb"][0] == "[0] 14 15 16 17 18 19"
    # the same model exported to the HF GQLA layout serves the same tokens
    hf_dir = tmp_path / "hf_gqla"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "convert_gqla.py"), "export-hf", "--load",
                        str(ckpt), "--save", str(hf_dir), "--layout", "gqla"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "serve", "generate.py"), "generate", "--load", str(hf_dir),
                        "--prompt-ids", "10 11 12 13", "--prompt-ids", "40 41", "--prompt-ids", "",
                        "--decode-path", "gqa", "--max-new-tokens", "6"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [l for l in r.stdout.splitlines() if l.startswith("[")] == outs["gqa"]


def test_serve_cli_under_torchrun_tp2(tmp_path):
    pytest.importorskip("megatron.core")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    ckpt = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain", "pretrain_gqla.py"), "--recipe", "tiny_cpu",
                        "--mock-data", "--train-iters", "30", "--save", str(ckpt), "--save-interval", "30"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", os.path.join(ROOT, "serve", "generate.py"),
                        "generate", "--load", str(ckpt), "--prompt-ids", "10 11 12 13", "--decode-path", "auto",
                        "--max-new-tokens", "6"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("TP 2:") == 1  # rank 0 prints
    assert "[0] 14 15 16 17 18 19" in r.stdout


# ---- CUDA-graph bookkeeping (capture itself needs CUDA: tests/gpu/test_engine_cuda_graphs.py)
def test_batch_buckets():
    from gqla_megatron.inference.engine import batch_bucket

    assert [batch_bucket(b, 128) for b in (1, 2, 3, 5, 8, 9, 100, 128)] == [1, 2, 4, 8, 8, 16, 128, 128]
    assert [batch_bucket(b, 6) for b in (3, 5, 6)] == [4, 6, 6]
    with pytest.raises(ValueError, match="batch must be in"):
        batch_bucket(7, 6)


def test_cuda_graphs_fall_back_on_cpu_and_static_buffer_path_gives_same_tokens(capsys):
    from gqla_megatron.inference.engine import StepGraphs

    mw = model(seed=2)
    eng = GQLAEngine(mw, CFG, decode_path="gqa", max_batch=4, max_seq_len=48, device_spec=H100, cuda_graphs=True)
    assert "CUDA graphs need a CUDA device" in capsys.readouterr().err and not eng.cuda_graphs
    params = SamplingParams(max_new_tokens=10)
    base = eng.generate(PROMPTS, params)
    # the bucketed static-buffer path without capture: 3 requests run as a bucket of 4 rows
    eng._graphs = StepGraphs(capture=False)
    got = eng.generate(PROMPTS, params)
    assert eng._cache_rows == 4 and eng.caches[0]["v"].shape[0] == 4
    assert {k[0] for k in eng._graphs.entries} == {"main"}
    caches = eng.caches
    again = eng.generate(PROMPTS[:2], params)  # bucket 2: new caches, graphs dropped
    assert eng._cache_rows == 2 and eng.caches is not caches
    eng.switch_path("absorb")
    assert not eng._graphs.entries
    # a switch converts into the layouts the engine allocates (what graphs and warm-up assume)
    for path in ("gqa", "absorb"):
        eng.switch_path(path)
        fresh = eng._alloc_layers(2, 1)[0]
        for cache in eng.caches + eng.mtp_caches:
            assert cache.keys() == fresh.keys()
            for k, t in cache.items():
                assert t.is_contiguous() and t.shape == fresh[k].shape and t.dtype == fresh[k].dtype, (path, k)
    for a, b in zip(got, base):
        assert a.tokens == b.tokens and (a.logits - b.logits).abs().max() <= 1e-5
    assert [r.tokens for r in again] == [r.tokens for r in base[:2]]


def test_train_mtp_then_serve_speculative(tmp_path):
    """gqla-pretrain --mtp-num-layers 1 -> gqla-serve generate --mtp-speculative: the same tokens
    as plain greedy decoding, with the acceptance reported."""
    pytest.importorskip("megatron.core")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    ckpt = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain", "pretrain_gqla.py"), "--recipe", "tiny_cpu",
                        "--mock-data", "--train-iters", "30", "--mtp-num-layers", "1", "--save", str(ckpt),
                        "--save-interval", "30"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    serve = [sys.executable, os.path.join(ROOT, "serve", "generate.py"), "generate", "--load", str(ckpt),
             "--prompt-ids", "10 11 12 13", "--prompt-ids", "40 41", "--decode-path", "gqa", "--max-new-tokens", "8"]
    plain = subprocess.run(serve, capture_output=True, text=True, timeout=300, env=env)
    spec = subprocess.run(serve + ["--mtp-speculative"], capture_output=True, text=True, timeout=300, env=env)
    assert plain.returncode == 0 and spec.returncode == 0, plain.stderr[-2000:] + spec.stderr[-2000:]
    lines = lambda out: [l for l in out.splitlines() if l.startswith("[")]  # noqa: E731
    assert lines(spec.stdout) == lines(plain.stdout) and lines(plain.stdout)[0] == "[0] 14 15 16 17 18 19 20 21"
    acc = [l for l in spec.stdout.splitlines() if l.startswith("MTP speculative")]
    assert acc and "1 draft(s) per step" in acc[0], spec.stdout
    # the MTP head learned the mock data (+1 per token): a mis-loaded MTP layer would draft noise
    assert float(acc[0].split("acceptance ")[1].split()[0]) > 0.5, acc[0]
    bad = subprocess.run(serve + ["--mtp-speculative", "--temperature", "0.5"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2 and "greedy only" in bad.stderr


def test_backend_warmup_gets_the_engine_sizes(monkeypatch):
    """The engine asks its backend, once at load, to ready kernels for its own decode calls:
    its batch, cache capacity, query tokens per step and lengths dtype (long)."""
    from gqla_megatron.inference import backends as bk

    seen = []

    def warmup(self, cfg, device, dtype, **kw):
        seen.append((self.name, cfg.num_attention_heads, dtype, kw))
        return ["x"]

    monkeypatch.setattr(bk.DecodeBackend, "warmup", warmup)
    # the torch backends named: under TRITON_INTERPRET the engine's choice would be Triton's
    eng = GQLAEngine(model(), CFG, decode_path="absorb", max_batch=3, max_seq_len=40, device_spec=H100,
                     decode_backend="torch_absorb")
    assert eng.warmed == ["x"]
    assert seen == [("torch_absorb", 8, torch.float32,
                     dict(max_batch=3, capacity=40, s_q=(1,), len_dtype=torch.long))]
    GQLAEngine(model(), CFG, decode_path="gqa", max_batch=2, max_seq_len=16, device_spec=H100,
               decode_backend="torch_gqa")
    assert seen[-1] == ("torch_gqa", 8, torch.float32, dict(max_batch=2, capacity=16, s_q=(1,),
                                                             len_dtype=torch.long))


def test_step_rms_norm_is_the_reference_norm():
    """The decode step's RMSNorm (torch's F.rms_norm) gives the reference's bits in fp32 and
    fp64 on CPU, and reduces bf16 inputs in fp32 (at least as close to the fp64 norm)."""
    from gqla_megatron import reference as ref
    from gqla_megatron.inference.engine import rms_norm

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 3, 96, generator=g), torch.randn(96, generator=g)
    for dt in (torch.float32, torch.float64):
        assert torch.equal(rms_norm(x.to(dt), w.to(dt), 1e-5), ref.rms_norm(x.to(dt), w.to(dt), 1e-5))
    exact = ref.rms_norm(x.double(), w.double(), 1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    err = lambda y: (y.double() - exact).abs().max().item()  # noqa: E731
    assert err(rms_norm(xb, wb, 1e-5)) <= err(ref.rms_norm(xb, wb, 1e-5))
    assert rms_norm(x, None, 1e-5) is x
