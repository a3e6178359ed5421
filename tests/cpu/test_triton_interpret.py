"""CPU tier: the Triton decode kernels in Triton's interpreter, and decode-backend selection.

Kernel checks live in tests/cpu/triton_interpret_cases.py and run here in ONE subprocess with
TRITON_INTERPRET=1 in its environment from the start. Why a subprocess: Triton jits its own
helper functions (tl.cdiv, tl.max, tl.sum, ...) at import, in the mode the variable selects
then, and megatron-core imports triton while this pytest process collects tests; so the
interpreter cannot be switched on in-process, and setting the variable globally would leak into
other tests. (Our own kernels are jitted lazily per mode, so only Triton's helpers force this.)

In-process (no kernel runs): the split heuristic, config overrides, input validation, and
backend selection/fallback with the reasons listed, with TRITON_INTERPRET set or removed per
test by monkeypatch (``supported`` reads it at call time).
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[kernels])")

from gqla_megatron.config import GQLAConfig  # noqa: E402
from gqla_megatron.inference import backends as bk  # noqa: E402
from gqla_megatron.inference import triton_backends as tb  # noqa: E402
from gqla_megatron.kernels import triton_decode as td  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
CFG = GQLAConfig(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_lora_rank=32,
                 qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, q_lora_rank=24)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def no_interpret(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_kernels_in_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in [k for k in env if k.startswith("GQLA_DECODE_")]:
        del env[k]   # kernel overrides from the caller's shell must not change what is tested
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "--noconftest", "-p", "no:cacheprovider",
           str(REPO / "tests" / "cpu" / "triton_interpret_cases.py")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, f"interpreter kernel checks failed (rc {r.returncode}):\n{tail}"
    summary = [line for line in r.stdout.splitlines() if line.strip()][-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, tail


def _absorb_inputs(S=2, B=3, H=5, R=40, DR=8, T=70):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, S, H, R, generator=g), torch.randn(B, S, H, DR, generator=g),
            torch.randn(B, T, R, generator=g), torch.randn(B, T, DR, generator=g),
            torch.randint(0, T - S + 1, (B,), generator=g), 0.1)


def test_split_heuristic():
    kw = dict(waves=1.0, min_chunk=128, block_n=64)
    assert td.choose_num_splits(132, 8192, 132, **kw) == 1           # GPU already full
    assert td.choose_num_splits(1, 8192, 132, **kw) == 64             # capped by min_chunk
    assert td.choose_num_splits(1, 65536, 132, **kw) == 132           # fills the SMs
    assert td.choose_num_splits(32, 4096, 132, **kw) == 5
    assert td.choose_num_splits(1, 100, 132, **kw) == 1               # too short to split
    assert td.choose_num_splits(1, 10 ** 7, 10 ** 4, **kw) == td.MAX_SPLITS


def test_env_overrides_and_bad_config(monkeypatch):
    monkeypatch.setenv("GQLA_DECODE_GQA_BLOCK_N", "32")
    monkeypatch.setenv("GQLA_DECODE_GQA_NUM_SPLITS", "7")
    cfg, explicit = td.resolve_config("gqa", 4, torch.bfloat16)
    assert cfg.block_n == 32 and cfg.num_splits == 7 and explicit
    cfg, explicit = td.resolve_config("gqa", 4, torch.bfloat16, td.DecodeKernelConfig(block_n=128))
    assert cfg.block_n == 128
    monkeypatch.setenv("GQLA_DECODE_GQA_BLOCK_N", "48")
    with pytest.raises(ValueError, match="block_n must be a power of 2"):
        td.resolve_config("gqa", 4, torch.bfloat16)
    monkeypatch.setenv("GQLA_DECODE_GQA_BLOCK_N", "big")
    with pytest.raises(ValueError, match="GQLA_DECODE_GQA_BLOCK_N"):
        td.resolve_config("gqa", 4, torch.bfloat16)


def test_bad_inputs_rejected_before_launch():
    q, qr, c, kr, lengths, scale = _absorb_inputs()
    with pytest.raises(ValueError, match="dtype"):
        td.absorb_decode(q, qr, c.to(torch.bfloat16), kr, lengths, scale)
    with pytest.raises(ValueError, match="lengths \\+ s_q"):
        td.absorb_decode(q, qr, c, kr, lengths + 70, scale)
    with pytest.raises(ValueError, match="cache widths"):
        td.absorb_decode(q, qr, c[..., :8], kr, lengths, scale)
    with pytest.raises(ValueError, match="block_table"):
        td.absorb_decode(q, qr, c, kr, lengths, scale, block_table=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must be"):
        td.absorb_decode(q, qr, c, kr, lengths, scale, out=torch.empty(1, 2, 3, 4))
    with pytest.raises(ValueError, match="page ids"):
        table = torch.full((3, 5), 99, dtype=torch.int32)
        td.absorb_decode(q, qr, c[:, :64].reshape(12, 16, -1), kr[:, :64].reshape(12, 16, -1),
                         torch.tensor([3, 3, 3]), scale, block_table=table)


# ---- backends: selection and fallback, reasons listed ------------------------------------
def test_plain_cpu_falls_back_to_torch_with_reasons(no_interpret):
    for path in ("absorb", "gqa"):
        assert bk.PRIORITY[path][0] == f"triton_{path}" and bk.PRIORITY[path][-1] == f"torch_{path}"
        choice = bk.select_backend(path, CFG, CPU, torch.float32)
        assert choice.backend.name == f"torch_{path}"
        assert "TRITON_INTERPRET is not set" in " ".join(choice.rejected[f"triton_{path}"])
    with pytest.raises(ValueError, match="triton_gqa.*cannot run.*not CUDA"):
        bk.select_backend("gqa", CFG, CPU, torch.float32, requested="triton_gqa")


def test_rejection_reasons(interpret, monkeypatch):
    r = bk.REGISTRY["triton_absorb"].supported(CFG, CPU, torch.float64)
    assert any("float64 unsupported" in x for x in r)
    wide = dataclasses.replace(CFG, kv_lora_rank=2048)
    assert any("kv_lora_rank 2048" in x for x in bk.REGISTRY["triton_absorb"].supported(wide, CPU, torch.float32))
    big = dataclasses.replace(CFG, v_head_dim=512)
    assert any("v_head_dim 512" in x for x in bk.REGISTRY["triton_gqa"].supported(big, CPU, torch.float32))

    def no_triton():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(tb, "_kernels", no_triton)
    choice = bk.select_backend("gqa", CFG, CPU, torch.float32)
    assert choice.backend.name == "torch_gqa"
    assert "triton not importable" in choice.rejected["triton_gqa"][0]


