"""Kernel checks of the Triton decode kernels in Triton's interpreter (CPU). NOT collected by
the normal run (file name); tests/cpu/test_triton_interpret.py runs this file in a subprocess
with TRITON_INTERPRET=1 set before anything imports triton: Triton's own helper functions
(tl.cdiv, tl.max, tl.sum, ...) are jitted when triton is imported, so interpreter mode cannot
be switched on later inside a process (such as the main pytest process, where megatron-core
imports triton at collection time).

What is checked: small shapes with non-power-of-2 widths and head counts (masked tiles), ragged
lengths (0 .. capacity - s_q), s_q 1-4, contiguous and paged caches (page sizes below and above
the KV tile, shuffled page ids), forced 1 split (direct write) and 3 splits (combine kernel),
output buffers filled with NaN before the call, and cache slots / pages the kernel must not read
also NaN. Reference: gqla_megatron.reference's grouped attention in float64 on the same (rounded)
inputs. Tolerances: fp32 rel_l2 <= 2e-6 (fp32 accumulation and exp2 vs the float64 reference;
measured ~2e-7); bf16 rel_l2 <= 1e-2 and cosine >= 0.9999 (probabilities are rounded to bf16
before the PV product, as in every flash kernel, and the output is bf16). Also: the triton
backends' attend() (W_UK/W_UV folding included) and the engine's greedy tokens vs the torch
backends.
"""

import dataclasses
import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/cpu/test_triton_interpret.py (needs TRITON_INTERPRET=1 set "
                "before triton is imported)", allow_module_level=True)

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[kernels])")

from gqla_megatron import reference as ref  # noqa: E402
from gqla_megatron.config import GQLAConfig  # noqa: E402
from gqla_megatron.inference import backends as bk  # noqa: E402
from gqla_megatron.kernels import triton_decode as td  # noqa: E402
from gqla_megatron.testing import BF16_COSINE, assert_close_report  # noqa: E402

CPU = torch.device("cpu")
TOL = {torch.float32: dict(rel_l2=2e-6), torch.bfloat16: dict(rel_l2=1e-2, cos=BF16_COSINE)}
CFG = GQLAConfig(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_lora_rank=32,
                 qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, q_lora_rank=24)


def _lengths(B, T, S, g):
    """Ragged lengths covering the extremes: 0 and capacity - S."""
    lens = torch.randint(0, T - S + 1, (B,), generator=g)
    lens[0], lens[-1] = 0, T - S
    return lens


def _poison_beyond(cache_BT, lengths, S):
    """NaN in every slot t >= lengths[b] + S (the kernel must not read them)."""
    T = cache_BT.shape[1]
    dead = torch.arange(T)[None, :] >= (lengths + S)[:, None]
    cache_BT[dead] = float("nan")
    return cache_BT


def _to_paged(caches_BT, lengths, S, page, g):
    """Scatter contiguous (B, T, ...) caches into shuffled pages of a NaN pool (2 spare pages);
    table entries past each sequence's used pages point at a NaN page too."""
    B, T = caches_BT[0].shape[:2]
    per_seq = -(-T // page)
    n_pages = B * per_seq + 2
    perm = torch.randperm(n_pages, generator=g)
    table = perm[: B * per_seq].view(B, per_seq).to(torch.int32)
    pools = []
    for c in caches_BT:
        pool = torch.full((n_pages, page) + tuple(c.shape[2:]), float("nan"), dtype=c.dtype)
        for b in range(B):
            used = int(lengths[b]) + S
            for j in range(-(-used // page)):
                n = min(page, used - j * page)
                pool[table[b, j], :n] = c[b, j * page: j * page + n]
        pools.append(pool)
    spare = perm[B * per_seq]
    for b in range(B):
        table[b, -(-(int(lengths[b]) + S) // page):] = spare
    return pools, table


def _allowed(lengths, S, T):
    q_pos = lengths[:, None] + torch.arange(S)[None]
    return ref._causal_mask(S, T, q_pos, torch.arange(T))


def _absorb_case(S, dtype, seed, B=3, H=5, R=40, DR=8, T=50):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, R, generator=g).to(dtype)
    qr = torch.randn(B, S, H, DR, generator=g).to(dtype)
    c = torch.randn(B, T, R, generator=g).to(dtype)
    kr = torch.randn(B, T, DR, generator=g).to(dtype)
    lengths = _lengths(B, T, S, g)
    scale = 0.11
    want = ref._attend_groups(q.double(), qr.double(), c.double()[:, :, None], kr.double(),
                              c.double()[:, :, None], _allowed(lengths, S, T), scale, H)
    return g, q, qr, c, kr, lengths, scale, want


def _gqa_case(S, dtype, seed, B=3, H=6, G=2, DN=12, DR=8, DV=10, T=50):
    g = torch.Generator().manual_seed(seed)
    qn = torch.randn(B, S, H, DN, generator=g).to(dtype)
    qr = torch.randn(B, S, H, DR, generator=g).to(dtype)
    kn = torch.randn(B, T, G, DN, generator=g).to(dtype)
    v = torch.randn(B, T, G, DV, generator=g).to(dtype)
    kr = torch.randn(B, T, DR, generator=g).to(dtype)
    lengths = _lengths(B, T, S, g)
    scale = 0.13
    want = ref._attend_groups(qn.double(), qr.double(), kn.double(), kr.double(), v.double(),
                              _allowed(lengths, S, T), scale, H // G)
    return g, qn, qr, kn, v, kr, lengths, scale, want


LAYOUTS = ["contiguous", "paged8", "paged24", "paged32"]   # 32: each 16-key tile in one page
SMALL = td.DecodeKernelConfig(block_n=16)   # several KV tiles per split at T=50
# fp32: every (s_q, layout); bf16: s_q 1 and 4 on every layout (the interpreter is slow)
CASES = ([(S, lay, torch.float32) for S in (1, 2, 3, 4) for lay in LAYOUTS]
         + [(S, lay, torch.bfloat16) for S in (1, 4) for lay in LAYOUTS])
CASE_IDS = [f"sq{S}-{lay}-{'fp32' if dt == torch.float32 else 'bf16'}" for S, lay, dt in CASES]


@pytest.mark.parametrize("S,layout,dtype", CASES, ids=CASE_IDS)
def test_absorb_kernel_matches_reference(S, layout, dtype):
    g, q, qr, c, kr, lengths, scale, want = _absorb_case(S, dtype, seed=10 * S + len(layout))
    _poison_beyond(c, lengths, S)
    _poison_beyond(kr, lengths, S)
    table = None
    if layout != "contiguous":
        (c, kr), table = _to_paged([c, kr], lengths, S, int(layout[5:]), g)
    for splits in (1, 3):
        out = torch.full(want.shape, float("nan"), dtype=dtype)
        got = td.absorb_decode(q, qr, c, kr, lengths, scale, block_table=table, out=out,
                               config=dataclasses.replace(SMALL, num_splits=splits))
        assert got is out and bool(torch.isfinite(got).all())
        assert_close_report(f"absorb {layout} s_q={S} splits={splits} {dtype}", got, want, **TOL[dtype])


@pytest.mark.parametrize("S,layout,dtype", CASES, ids=CASE_IDS)
def test_gqa_kernel_matches_reference(S, layout, dtype):
    g, qn, qr, kn, v, kr, lengths, scale, want = _gqa_case(S, dtype, seed=10 * S + len(layout))
    for t in (kn, v, kr):
        _poison_beyond(t, lengths, S)
    table = None
    if layout != "contiguous":
        (kn, v, kr), table = _to_paged([kn, v, kr], lengths, S, int(layout[5:]), g)
    for splits in (1, 3):
        out = torch.full(want.shape, float("nan"), dtype=dtype)
        got = td.gqa_decode(qn, qr, kn, v, kr, lengths, scale, block_table=table, out=out,
                            config=dataclasses.replace(SMALL, num_splits=splits))
        assert got is out and bool(torch.isfinite(got).all())
        assert_close_report(f"gqa {layout} s_q={S} splits={splits} {dtype}", got, want, **TOL[dtype])


def test_row_blocks_and_default_heuristic():
    """More query rows than one tile (absorb H*S = 40 rows, GQA M*S = 24 rows with block_m 16),
    and the default config + split heuristic (8 'SMs' on CPU -> several splits at B=1)."""
    _, q, qr, c, kr, lengths, scale, want = _absorb_case(4, torch.float32, seed=3, B=1, H=10, T=160)
    plan = td.plan_decode("absorb", batch=1, s_q=4, heads=10, groups=1, max_len=160,
                          dtype=torch.float32, device=CPU)
    assert plan.num_splits > 1 and plan.row_blocks == -(-40 // plan.config.block_m)
    got = td.absorb_decode(q, qr, c, kr, lengths, scale)
    assert_close_report("absorb default", got, want, **TOL[torch.float32])
    got = td.absorb_decode(q, qr, c, kr, lengths, scale, config=td.DecodeKernelConfig(block_m=64))
    assert_close_report("absorb 1 row block", got, want, **TOL[torch.float32])
    got = td.absorb_decode(q, qr, c, kr, lengths, scale, config=td.DecodeKernelConfig(block_m=16))
    assert_close_report("absorb 3 row blocks", got, want, **TOL[torch.float32])
    _, qn, qr, kn, v, kr, lengths, scale, want = _gqa_case(4, torch.float32, seed=4, B=1, H=12, G=2, T=100)
    got = td.gqa_decode(qn, qr, kn, v, kr, lengths, scale, config=td.DecodeKernelConfig(block_m=16))
    assert_close_report("gqa 2 row blocks", got, want, **TOL[torch.float32])


def _attend_inputs(S, seed):
    g = torch.Generator().manual_seed(seed)
    w = ref.GQLAWeights.random(CFG, generator=g, dtype=torch.float32)
    B, T, H = 3, 40, CFG.num_attention_heads
    q_nope = torch.randn(B, S, H, CFG.qk_head_dim, generator=g)
    q_rope = torch.randn(B, S, H, CFG.qk_pos_emb_head_dim, generator=g)
    c = torch.randn(B, T, CFG.kv_lora_rank, generator=g)
    kr = torch.randn(B, T, CFG.qk_pos_emb_head_dim, generator=g)
    lengths = _lengths(B, T, S, g)
    k_nope, v = ref.expand_latent(c, w, CFG)
    want = ref._attend_groups(q_nope.double(), q_rope.double(), k_nope.double(), kr.double(),
                              v.double(), _allowed(lengths, S, T), CFG.softmax_scale, CFG.heads_per_group)
    caches = {"absorb": {"c": c, "k_rope": kr},
              "gqa": {"k_nope": k_nope.contiguous(), "v": v.contiguous(), "k_rope": kr}}
    return w, q_nope, q_rope, caches, lengths, want


@pytest.mark.parametrize("S", [1, 4])
@pytest.mark.parametrize("path", ["absorb", "gqa"])
def test_triton_backend_attend_matches_reference(path, S):
    choice = bk.select_backend(path, CFG, CPU, torch.float32)
    assert choice.backend.name == f"triton_{path}"
    assert set(choice.rejected) <= {"tilelang_absorb"}   # Hopper only: rejected on CPU
    w, q_nope, q_rope, caches, lengths, want = _attend_inputs(S, seed=S)
    be = choice.backend
    got = be.attend(be.prepare(w, CFG), q_nope, q_rope, caches[path], lengths, CFG)
    assert_close_report(f"triton_{path} s_q={S}", got, want, rel_l2=2e-6)


def test_engine_auto_picks_triton_and_matches_torch_tokens():
    from gqla_megatron.inference.engine import GQLAEngine, SamplingParams
    from gqla_megatron.roofline import get_device
    from gqla_megatron.testing import random_model_weights

    mw = random_model_weights(CFG, vocab=50, layers=1, seed=2)
    prompts = [[1, 2, 3], [6, 7]]
    for path in ("absorb", "gqa"):
        toks = {}
        for backend in ("auto", f"torch_{path}"):
            eng = GQLAEngine(mw, CFG, decode_path=path, max_batch=2, max_seq_len=16,
                             device_spec=get_device("H100"), decode_backend=backend)
            if backend == "auto":
                assert eng.backend.name == f"triton_{path}"
            toks[backend] = [r.tokens for r in eng.generate(prompts, SamplingParams(max_new_tokens=4))]
        assert toks["auto"] == toks[f"torch_{path}"]


@pytest.mark.parametrize("page", [0, 16])
@pytest.mark.parametrize("path", ["absorb", "gqa"])
def test_backend_warmup_runs_every_planned_call(path, page):
    """The load-time warm-up runs the kernels (split + combine and direct) through attend on its
    dummy inputs, contiguous and paged, without an error."""
    be = bk.REGISTRY[f"triton_{path}"]()
    done = be.warmup(CFG, CPU, torch.float32, max_batch=20, capacity=300, s_q=(1, 2), len_dtype=torch.int64,
                     page=page)
    W = CFG.kv_lora_rank if path == "absorb" else CFG.v_head_dim
    splits = {c.num_splits for c in td.warmup_plan(path, max_batch=20, s_q=(1, 2), heads=CFG.num_attention_heads,
                                                   groups=CFG.num_query_groups, width=W, max_len=304 if page else 300,
                                                   dtype=torch.float32, sms=td.num_sms(CPU))}
    assert 1 in splits and len(splits) > 1, splits
    assert len(done) == 2 and all(f"triton {path} kernels" in d for d in done), done


@pytest.mark.parametrize("block_dv,split_block,nsplit", [(64, 4, 10), (32, 8, 3), (64, 16, 16)])
def test_combine_pass_multi_pass_and_wide_blocks(block_dv, split_block, nsplit):
    """The combine kernel at the column blocks / splits per pass combine_block can choose (here
    scaled to small widths: 64-wide rows in one block, several passes over the splits, a split
    with no keys: LSE -inf and a zero partial, as the split kernels write it) against the
    base-2 log-sum-exp merge in float64."""
    g = torch.Generator().manual_seed(nsplit)
    B, rows, H, DV = 2, 6, 3, 64
    opart = torch.randn(B, rows, nsplit, DV, generator=g)
    lse = torch.randn(B, rows, nsplit, generator=g) * 3
    lse[0, 1, 0] = float("-inf")
    opart[0, 1, 0] = 0.0
    lse[1, 2, :] = float("-inf")         # a row with no keys at all: output 0
    out = torch.full((B, rows // H, H, DV), float("nan"))
    grid = (rows, triton.cdiv(DV, block_dv), B)
    td._combine[grid](opart, lse, out, opart.stride(0), opart.stride(1), opart.stride(2), lse.stride(0),
                      lse.stride(1), out.stride(0), out.stride(1), out.stride(2), nsplit, H, DV=DV,
                      SPLIT_PAD=td._pow2(nsplit), SPLIT_BLOCK=split_block, BLOCK_DV=block_dv, DISCARD=False,
                      num_warps=4, num_stages=1)
    w = torch.softmax(lse.double() * math.log(2.0), dim=-1).nan_to_num(0.0)   # LSE is base 2
    want = torch.einsum("bmp,bmpd->bmd", w, opart.double()).view(B, rows // H, H, DV)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), want, atol=1e-5), (out.double() - want).abs().max()
