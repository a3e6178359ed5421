"""CPU tier: the TileLang absorb kernel without a GPU.

Always: the kernel-choice rule (``prefers``) and the capability reasons on a CPU machine.
With tilelang and nvcc installed (``pip install -e .[tilelang]``; skipped with the reason
otherwise): the kernels compile for sm_90a offline, and the generated CUDA is what the module
docstring promises -- a warp-specialised program (a 128-thread producer warpgroup beside the
two 128-thread consumer warpgroups, register budgets moved between them by setmaxnreg), TMA
loads of the latent, RoPE-key and query tiles, ``wgmma`` products, and no register spills under
ptxas.
"""

import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

from gqla_megatron.kernels import tilelang_decode as tld

CPU = torch.device("cpu")


def test_prefers_rule():
    big = tld.MIN_TOKENS
    assert tld.prefers(1, 64, big, 0)
    assert tld.prefers(8, 32, big // 8, 0)
    assert not tld.prefers(8, 32, big // 8 - 1, 0)            # too few cached tokens
    few = tld.MIN_TOKENS_FEW_ROWS // 128
    assert not tld.prefers(128, 16, few - 1, 0)                 # 16 rows (4x padded work): from 256k tokens
    assert tld.prefers(128, 16, few, 0)
    assert not tld.prefers(4096, 8, 4096, 0)                    # under 16 rows: never
    assert tld.prefers(128, 64, 8192, 128)                      # 128-token pages: whole tiles
    assert not tld.prefers(128, 64, 8192, 16)                   # 16-token pages: not TMA tiles
    table64 = torch.zeros(2, 3, dtype=torch.int64)
    assert not tld.prefers(128, 64, 8192, 64, block_table=table64)   # kernel takes int32 tables


def test_backend_compiles_at_load_only_what_decode_will_run(monkeypatch):
    """tilelang_absorb.warmup compiles the kernels (direct, split) that the calls TileLang will
    serve use, with the dtypes and page size attend() will pass -- the same lru-cached
    compile_absorb call, so the first decode step that needs them finds them compiled -- and
    nothing when no call up to these sizes runs them (each is ~40 s on a fresh host)."""
    from gqla_megatron.config import GQLAConfig
    from gqla_megatron.inference.backends import REGISTRY

    from gqla_megatron.kernels import triton_decode as td

    calls, triton = [], []
    monkeypatch.setattr(tld, "compile_absorb", lambda **kw: calls.append(kw))
    monkeypatch.setattr(td, "num_sms", lambda device: 132)   # the split plan of an H200
    backend = REGISTRY["tilelang_absorb"]()
    # the Triton fallback's warm-up (tests/cpu/test_decode_warmup.py) gets the calls prefers leaves
    monkeypatch.setattr(backend, "_warm_triton", lambda cfg, device, dtype, **kw: triton.append((cfg, kw)) or [])
    big = GQLAConfig(hidden_size=4096, num_attention_heads=32, num_query_groups=8, kv_lora_rank=512,
                     qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128)
    done = backend.warmup(big, CPU, torch.bfloat16, max_batch=8, capacity=8192, s_q=(1,),
                          len_dtype=torch.int64)
    # every batch reaches TileLang (B x 8192 >= MIN_TOKENS) and splits its keys on 132 SMs
    assert len(done) == 1 and [c["direct"] for c in calls] == [False]
    assert all(c == dict(r=512, dr=64, dtype="bfloat16", len_dtype="int64", page=0, direct=c["direct"])
               for c in calls)
    # two Triton passes: the combine variants of the calls TileLang serves (planned with its own
    # split counts), then the Triton kernel's calls below its sizes
    (_, tl_kw), (_, kw) = triton
    assert tl_kw["calls"] == tld.warmup_plan("absorb", max_batch=8, s_q=(1,), heads=32, groups=1, width=512,
                                             max_len=8192, dtype=torch.bfloat16, sms=132,
                                             runs=tl_kw["runs"]) and "calls" not in kw
    for k in (tl_kw, kw):
        assert k["max_batch"] == 8 and k["capacity"] == 8192 and k["page"] == 0
    # at 32+ rows (32 heads x s_q) TileLang from MIN_TOKENS cached tokens (B x 8192): every call
    cases = ((1, 1), (4, 1), (3, 2), (8, 2))
    assert [kw["runs"](b, s) for b, s in cases] == [False] * 4
    assert [tl_kw["runs"](b, s) for b, s in cases] == [True] * 4
    calls.clear()
    # 16 heads x 1 token: TileLang only from 256k cached tokens; below, the Triton kernel serves
    # every call -> nothing to compile
    small = GQLAConfig(hidden_size=2048, num_attention_heads=16, num_query_groups=4, kv_lora_rank=512,
                       qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128)
    assert backend.warmup(small, CPU, torch.bfloat16, max_batch=7, capacity=32768, s_q=(1,),
                          len_dtype=torch.int64) == [] and calls == []
    # from 16 sequences on it does: splits while B is small, one program per sequence at B = 128
    assert len(backend.warmup(small, CPU, torch.bfloat16, max_batch=128, capacity=32768, s_q=(1,),
                              len_dtype=torch.int64)) == 2
    assert sorted(c["direct"] for c in calls) == [False, True]
    calls.clear()
    # ... and MTP speculation (s_q 2 -> 32 rows) reaches it with 7 sequences: split calls only
    assert len(backend.warmup(small, CPU, torch.bfloat16, max_batch=7, capacity=32768, s_q=(1, 2),
                              len_dtype=torch.int64)) == 1
    assert [c["direct"] for c in calls] == [False]
    # too few cached tokens in any call (B x capacity < MIN_TOKENS)
    calls.clear()
    assert backend.warmup(big, CPU, torch.bfloat16, max_batch=1, capacity=512, s_q=(1,),
                          len_dtype=torch.int64) == [] and calls == []


def test_problems_on_cpu_name_each_reason():
    why = " ".join(tld.absorb_problems(CPU, torch.float32, kv_lora_rank=256, rope_dim=32))
    for part in ("not CUDA", "float32 unsupported", "kv_lora_rank 256", "rope dim 32"):
        assert part in why, (part, why)
    assert not any("kv_lora_rank" in p or "rope" in p
                   for p in tld.absorb_problems(CPU, torch.bfloat16, kv_lora_rank=512, rope_dim=64))


def test_wrapper_rejects_before_launch():
    q = torch.zeros(1, 1, 32, 512, dtype=torch.bfloat16)
    qr = torch.zeros(1, 1, 32, 64, dtype=torch.bfloat16)
    c = torch.zeros(1, 128, 512, dtype=torch.bfloat16)
    kr = torch.zeros(1, 128, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="tilelang absorb kernel: .*not CUDA"):
        tld.absorb_decode(q, qr, c, kr, torch.zeros(1, dtype=torch.int32), 0.1)


def _nvcc():
    for d in [os.environ.get("CUDA_HOME", "")] + os.environ.get("PATH", "").split(os.pathsep):
        for cand in (os.path.join(d, "bin", "nvcc"), os.path.join(d, "nvcc")):
            if d and os.path.isfile(cand):
                return cand
    try:   # the nvidia-cuda-nvcc wheel
        import nvidia.cu13  # noqa: F401
        cand = os.path.join(os.path.dirname(nvidia.cu13.__file__), "bin", "nvcc")
        return cand if os.path.isfile(cand) else None
    except Exception:
        return None


@pytest.fixture(scope="module")
def offline():
    problem = tld.import_problem()
    if problem:
        pytest.skip(f"{problem} (pip install -e .[tilelang])")
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (CUDA_HOME, PATH or the nvidia-cuda-nvcc wheel)")
    os.environ["PATH"] = os.path.dirname(nvcc) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
    return nvcc


@pytest.mark.parametrize("page,direct", [(0, False), (0, True), (64, False)],
                         ids=["contiguous-split", "contiguous-direct", "paged64-split"])
def test_compiles_for_sm90a_warp_specialised_without_spills(offline, page, direct):
    import tilelang

    kern = tld.compile_absorb(r=512, dr=64, dtype="bfloat16", len_dtype="int32", page=page,
                              direct=direct, target="sm_90a")
    src = kern.get_kernel_source()
    assert "__launch_bounds__(384" in src, "expected 3 warpgroups: producer, scores, right half"
    for desc in ("C_desc", "KR_desc", "Q_desc", "QR_desc"):
        assert re.search(rf"tma_load\({desc}\b", src), f"{desc} is not loaded by TMA"
    assert "wgmma" in src
    # the score products are issued back to back and waited for once (the async wgmma path)
    assert "wait_wgmma<0>" in src
    assert "warpgroup_reg_alloc" in src and "warpgroup_reg_dealloc" in src
    # the three warpgroups' register budgets must fit the SM's 64K registers together: a
    # setmaxnreg.inc asking for more than the others gave back waits forever on the GPU (the
    # pipeline probe of session 5 hung that way)
    budgets = [int(n) for n in re.findall(r"warpgroup_reg_(?:alloc|dealloc)<(\d+)>", src)]
    assert len(budgets) == 3 and 128 * sum(budgets) <= 65536, budgets
    # ptxas on the generated source: registers within the consumer cap, nothing spilled
    inc = os.path.join(os.path.dirname(tilelang.__file__), "src")
    cutlass = os.path.join(os.path.dirname(tilelang.__file__), "3rdparty", "cutlass", "include")
    with tempfile.TemporaryDirectory() as d:
        cu = os.path.join(d, "k.cu")
        with open(cu, "w") as f:
            f.write(src)
        cmd = [offline, "--cubin", "-O3", "-arch=sm_90a", "-std=c++20", f"-I{inc}", f"-I{cutlass}",
               "-Xptxas", "-v", "-o", os.path.join(d, "k.cubin"), cu]
        if shutil.which("g++"):
            cmd.insert(1, f"-ccbin={shutil.which('g++')}")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    info = r.stderr + r.stdout
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    assert spills and all(int(a) == 0 and int(b) == 0 for a, b in spills), info[-1500:]


def test_tma_layout_check():
    t = torch.zeros(2, 8, 512, dtype=torch.bfloat16)
    assert tld._tma_ok(t)
    assert not tld._tma_ok(t[:, :, 1:])           # start 2 bytes in, row pitch still aligned
    assert not tld._tma_ok(t[:, :, ::2])           # last dim strided
    assert tld._tma_ok(t[:, 2:6])                  # a row slice keeps 1 KiB alignment
