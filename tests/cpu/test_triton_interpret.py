"""CPU tier: the Triton decode kernels in Triton's interpreter, and decode-backend selection.

Kernel checks live in tests/cpu/triton_interpret_cases.py and run here in ONE subprocess with
TRITON_INTERPRET=1 in its environment from the start. Why a subprocess: Triton jits its own
helper functions (tl.cdiv, tl.max, tl.sum, ...) at import, in the mode the variable selects
then, and megatron-core imports triton while this pytest process collects tests; so the
interpreter cannot be switched on in-process, and setting the variable globally would leak into
other tests. (Our own kernels are jitted lazily per mode, so only Triton's helpers force this.)

In-process (no kernel runs): the split heuristic, config overrides, input validation, and
backend selection/fallback with the reasons listed, with TRITON_INTERPRET set or removed per
test by monkeypatch (``supported`` reads it at call time); and the default launch configs of
the real shapes compiled for sm_90a with Triton's compiler and ptxas (no GPU needed): shared
memory within the 227 KiB limit and no register spills.
"""

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
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
    if td._BOUND_MODE and td._BOUND_MODE[0]:
        pytest.skip("the decode kernels already ran under TRITON_INTERPRET in this process (one mode "
                    "per process); the sm_90 compile checks need compiled mode: run without it")
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
    assert td.choose_num_splits(1, 8192, 132, **kw) == 61             # cap 64 (min_chunk), -5 %
    assert td.choose_num_splits(1, 65536, 132, **kw) == 126           # ~ fills the SMs
    assert td.choose_num_splits(32, 4096, 132, **kw) == 4             # 128 programs, one wave
    assert td.choose_num_splits(64, 32768, 132, **kw) == 2            # not 5: a 42 %-busy 3rd wave
    assert td.choose_num_splits(8, 8192, 132, **kw) == 16             # 128 programs
    assert td.choose_num_splits(110, 8192, 132, **kw) == 1            # >= 80 % of the slots
    assert td.choose_num_splits(1, 100, 132, **kw) == 1               # too short to split
    assert td.choose_num_splits(1, 10 ** 7, 10 ** 4, **kw) == 244            # cap MAX_SPLITS, -5 %
    assert td.choose_num_splits(32, 4096, 132, **{**kw, "waves": 2.0}) == 8   # 2 programs per SM
    # the rule, brute force: smallest split count within 5 % of the best modelled time
    for units in (1, 3, 8, 20, 50, 100):
        for max_len in (1000, 8192, 40000):
            s = td.choose_num_splits(units, max_len, 132, **kw)
            cap = min(td.MAX_SPLITS, -(-max_len // 128))
            t = {k: -(-(units * k) // 132) / k for k in range(1, cap + 1)}
            assert t[s] <= 1.05 * min(t.values())
            assert all(t[k] > 1.05 * min(t.values()) for k in range(1, s))


def test_split_heuristic_with_tile_rounding():
    """tile_rounding (the TileLang kernel's planner): splits are scored by whole 64-key tiles per
    program and the programs that get keys -- 4096 keys in 31 splits leave 9 empty and give the
    rest 3 tiles; 64 splits give one tile to each of 64 programs."""
    assert td.split_time_tiles(1, 31, 132, 4096, 64) == 3      # 22 programs x 3 tiles, one wave
    assert td.split_time_tiles(1, 64, 132, 4096, 64) == 1
    assert td.split_time_tiles(1, 126, 132, 32768, 64) == 5    # 103 programs of 5 tiles
    assert td.split_time_tiles(1, 128, 132, 32768, 64) == 4
    assert td.split_time_tiles(2, 128, 132, 32768, 64) == 8    # 256 programs: two waves of 4
    kw = dict(waves=1.0, min_chunk=64, block_n=64, tile_rounding=True)
    assert td.choose_num_splits(1, 4096, 132, **kw) == 64
    assert td.choose_num_splits(1, 8192, 132, **kw) == 128
    assert td.choose_num_splits(1, 32768, 132, **kw) == 128
    assert td.choose_num_splits(32, 4096, 132, **kw) == 4      # as without rounding
    assert td.choose_num_splits(8, 32768, 132, **kw) == 16
    from gqla_megatron.kernels import tilelang_decode as tld

    assert tld.splits_for(1, 32, 4096, 132) == 64 and tld.splits_for(8, 32, 32768, 132) == 16
    # 33-64 rows per program (s_q 2, 128 heads): the Triton rule, two tiles at least
    assert tld.splits_for(1, 64, 4096, 132) == 31 and tld.splits_for(1, 128, 4096, 132) == 31
    assert tld.splits_for(8, 64, 1024, 132) == 8


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


def test_launch_plans_cached_and_follow_env(monkeypatch):
    """Repeated calls reuse one plan (no host work per decode step); a GQLA_DECODE_* change or an
    explicit config gives a new plan; absorb defaults follow the H200 sweep (64 x 64 at 64 rows)."""
    monkeypatch.delenv("GQLA_DECODE_ABSORB_BLOCK_N", raising=False)
    kw = dict(batch=128, s_q=2, heads=32, groups=1, max_len=8192, dtype=torch.bfloat16, device=CPU)
    p1 = td.plan_decode("absorb", **kw)
    assert td.plan_decode("absorb", **kw) is p1 and not p1.explicit
    assert (p1.config.block_m, p1.config.block_n, p1.config.num_warps, p1.config.num_stages) == (64, 64, 8, 2)
    assert td.plan_decode("absorb", **{**kw, "s_q": 1}).config.block_m == 32
    monkeypatch.setenv("GQLA_DECODE_ABSORB_BLOCK_N", "32")
    p2 = td.plan_decode("absorb", **kw)
    assert p2 is not p1 and p2.config.block_n == 32 and p2.explicit
    p3 = td.plan_decode("absorb", **kw, config=td.DecodeKernelConfig(num_splits=3))
    assert p3.num_splits == 3 and p3.grid[0] == 3


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
        first = "tilelang_absorb" if path == "absorb" else "triton_gqa"
        assert bk.PRIORITY[path][0] == first and bk.PRIORITY[path][-1] == f"torch_{path}"
        choice = bk.select_backend(path, CFG, CPU, torch.float32)
        assert choice.backend.name == f"torch_{path}"
        assert "TRITON_INTERPRET is not set" in " ".join(choice.rejected[f"triton_{path}"])
    # the TileLang kernel: Hopper only, bf16/fp16, and its Triton fallback must run too
    why = " ".join(bk.select_backend("absorb", CFG, CPU, torch.float32).rejected["tilelang_absorb"])
    assert "not CUDA" in why and "float32 unsupported" in why and "triton fallback" in why
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




# ---- the default launch configs compile for the H200 (sm_90a) without a GPU --------------
SM90_SMEM = 232448   # max dynamic shared memory per block on sm_90 (227 KiB)
_LAST_PTX = [""]   # PTX of the last _compile_sm90 call (for probes)


def _compile_sm90(fn, pointers, runtime_i32, constexprs, num_warps, num_stages):
    """triton.compile for cuda:90 (no driver needed; ptxas ships with triton); returns
    (shared bytes, ptxas -v report). Pointers and strides get the divisibility-by-16 hint that
    the JIT gives real tensors."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    td._bind_helpers(False)
    jf = triton.jit(fn)
    sig, attrs = {}, {}
    for i, name in enumerate(jf.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name], attrs[(i,)] = pointers[name], [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in runtime_i32:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(jf, sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    ptx = Path(tempfile.mkdtemp()) / "k.ptx"
    ptx.write_text(k.asm["ptx"])
    r = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", str(ptx), "-o", os.devnull],
                       capture_output=True, text=True)
    _LAST_PTX[0] = k.asm["ptx"]
    return k.metadata.shared, r.stderr


SM90_CASES = [  # (path, query rows per tile source, dtype, paged)
    ("absorb", 16, torch.bfloat16, False),
    ("absorb", 32, torch.bfloat16, False), ("absorb", 32, torch.bfloat16, True),
    ("absorb", 64, torch.bfloat16, False), ("absorb", 128, torch.bfloat16, False),
    ("absorb", 32, torch.float32, False), ("absorb", 64, torch.float32, False),
    ("gqa", 4, torch.bfloat16, False), ("gqa", 4, torch.bfloat16, True),
    ("gqa", 16, torch.bfloat16, False), ("gqa", 4, torch.float32, False),
]
# sm_90 per-SM limits (CUDA occupancy rules): 64K registers, allocated per warp in units of 256;
# 228 KiB shared memory, 1 KiB of it reserved per resident block; 64 warps; 32 blocks
SM90_SM_SMEM, SM90_REGS, SM90_WARPS = 233472, 65536, 64


def sm90_blocks_per_sm(shared: int, regs: int, num_warps: int) -> int:
    by_smem = SM90_SM_SMEM // (shared + 1024)
    by_regs = SM90_REGS // (-(-regs * 32 // 256) * 256 * num_warps)
    return min(by_smem, by_regs, SM90_WARPS // num_warps, 32)


def test_sm90_occupancy_rule():
    assert sm90_blocks_per_sm(112640, 255, 4) == 2     # 2 x 113.7 KB, 2 x 32K registers
    assert sm90_blocks_per_sm(188416, 177, 8) == 1
    assert sm90_blocks_per_sm(90112, 150, 4) == 2      # shared memory bound (3 by registers)
    assert sm90_blocks_per_sm(20000, 64, 4) == 8


@pytest.mark.parametrize("path,rows,dtype,paged", SM90_CASES)
def test_default_configs_compile_for_sm90_without_spills(path, rows, dtype, paged, no_interpret):
    """The default tiles of the LLaMA-3-8B / 128-head shapes fit sm_90's shared memory and
    registers, checked with Triton's own compiler and ptxas, no GPU needed; at most a few bytes
    of spill (the 32-row absorb tile sits at the 255-register cap: 12 bytes, 24 paged); and the default
    ``waves`` equals the number of these programs one SM holds at once."""
    cfg, _ = td.resolve_config(path, rows, dtype)
    p = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    common = dict(PAGE=64, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGED=paged, DIRECT=False,
                  DOT_PREC="ieee" if dtype == torch.float32 else None, DOT_DTYPE=td._TL_DTYPES[dtype])
    if path == "absorb":
        ptrs = dict(Q=p, QR=p, C=p, KR=p, BT="*i32", LENS="*i64", OPART="*fp32", LSE="*fp32", OUT=p)
        consts = dict(R=512, DR=64, R_PAD=512, DR_PAD=64, **common)
        fn = td._absorb_partial_kernel
    else:
        ptrs = dict(QN=p, QR=p, KN=p, V=p, KR=p, BT="*i32", LENS="*i64", OPART="*fp32", LSE="*fp32", OUT=p)
        consts = dict(DN=128, DR=64, DV=128, DN_PAD=128, DR_PAD=64, DV_PAD=128, **common)
        fn = td._gqa_partial_kernel
    shared, report = _compile_sm90(fn, ptrs, ("sbt_b",) + td._RUNTIME, consts, cfg.num_warps, cfg.num_stages)
    assert shared <= SM90_SMEM, f"{cfg}: {shared} B shared memory > {SM90_SMEM}"
    spill = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    assert spill <= 32, f"{cfg}: {report}"
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    per_sm = sm90_blocks_per_sm(shared, regs, cfg.num_warps)
    assert cfg.waves == per_sm, \
        f"{cfg}: {shared} B shared, {regs} registers -> {per_sm} per SM"


def test_combine_block_rule():
    """Widest column block with ~2 programs per SM, at most 8192 partials per pass (measured:
    benchmarks/decode_kernels_h200/experiments/combine_cost)."""
    sms = 132
    assert td.combine_block(32, 32, 512, 4, sms) == (512, 4)      # 1024 programs of whole rows
    assert td.combine_block(8, 32, 512, 16, sms) == (256, 16)     # 512 programs
    assert td.combine_block(8, 64, 512, 16, sms) == (512, 16)
    assert td.combine_block(1, 32, 512, 126, sms) == (32, 64)     # B = 1: latency-bound, narrow
    assert td.combine_block(1, 64, 512, 126, sms) == (64, 64)
    assert td.combine_block(1, 32, 128, 32, sms) == (32, 32)      # gqa
    assert td.combine_block(8, 32, 512, 200, sms) == (256, 32)    # 8192 partials per pass
    for B, rows, nsplit in ((1, 4, 244), (2, 16, 100), (128, 128, 2)):
        bdv, sb = td.combine_block(B, rows, 512, nsplit, sms)
        assert 32 <= bdv <= 512 and sb * bdv <= 8192 and 1 <= sb <= 64


@pytest.mark.parametrize("discard", [False, True], ids=["keep", "discard"])
@pytest.mark.parametrize("block_dv,split_block", [(512, 16), (128, 64), (32, 64)])
def test_combine_kernel_compiles_for_sm90(block_dv, split_block, discard, no_interpret):
    shared, report = _compile_sm90(td._combine_kernel, dict(OPART="*fp32", LSE="*fp32", OUT="*bf16"),
                                   ("nsplit", "H"), dict(DV=512, SPLIT_PAD=256, SPLIT_BLOCK=split_block,
                                                         BLOCK_DV=block_dv, DISCARD=discard), 4, 1)
    assert shared <= SM90_SMEM and "0 bytes spill stores" in report, report
    # DISCARD: one predicated discard per 128-byte line, after a barrier; none otherwise
    ptx = _LAST_PTX[0]
    assert ("discard.global.L2" in ptx) == discard
    if discard:
        assert ptx.index("bar.sync") < ptx.index("discard.global.L2")


def test_combine_discards_only_whole_private_lines(monkeypatch):
    """discard_ok: only with the flag, on CUDA tensors whose 128-byte lines each belong to one
    (row, split, 32 columns) -- 128-byte aligned start, strides in whole lines, DV % 32 == 0."""
    monkeypatch.setattr(td, "COMBINE_DISCARD", True)
    monkeypatch.setattr(td, "interpreting", lambda: False)

    class Fake:
        is_cuda = True

        def __init__(self, ptr, strides):
            self.ptr, self.strides = ptr, strides

        def data_ptr(self):
            return self.ptr

        def stride(self, i=None):
            return self.strides if i is None else self.strides[i]

    assert td.discard_ok(Fake(4096, (64 * 4 * 512, 4 * 512, 512, 1)), 512)
    assert not td.discard_ok(Fake(4096 + 64, (64 * 4 * 512, 4 * 512, 512, 1)), 512)   # misaligned
    assert not td.discard_ok(Fake(4096, (64 * 4 * 48, 4 * 48, 48, 1)), 48)            # lines shared
    assert not td.discard_ok(Fake(4096, (64 * 4 * 512, 4 * 512, 1, 4)), 512)          # strided
    monkeypatch.setattr(td, "COMBINE_DISCARD", False)
    assert not td.discard_ok(Fake(4096, (64 * 4 * 512, 4 * 512, 512, 1)), 512)
