"""CPU tier: the load-time warm-up of the Triton decode kernels, without running them.

``triton_decode.warmup_plan`` (pure: sizes and SM count in, calls out) must give, for every
batch an engine can decode (eager: 1 .. max_batch; CUDA-graph buckets are among them) and every
s_q, a call with the same launch configuration -- splits, combine constexprs, s_q, batch == 1 --
as the decode call computes for itself, and no two calls with one configuration. The backends'
``warmup`` must run ``attend`` on inputs laid out as the engine's (strides are what Triton
specialises on). The kernels themselves run in tests/cpu/triton_interpret_cases.py (interpreter)
and tests/gpu/test_decode_warmup_gpu.py (no compile left for a decode step on the GPU).
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[kernels])")

from gqla_megatron import reference as ref  # noqa: E402
from gqla_megatron.config import GQLAConfig  # noqa: E402
from gqla_megatron.inference.backends import REGISTRY  # noqa: E402
from gqla_megatron.inference.engine import batch_bucket  # noqa: E402
from gqla_megatron.kernels import triton_decode as td  # noqa: E402

CPU = torch.device("cpu")
CFG = GQLAConfig(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_lora_rank=32,
                 qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=24, q_lora_rank=24)


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    for k in [k for k in os.environ if k.startswith("GQLA_DECODE_")]:
        monkeypatch.delenv(k)


def launch_key(path, B, S, heads, groups, width, max_len, dtype, sms):
    """The launch configuration of one decode call, from the config functions directly."""
    rows = heads * S if path == "absorb" else heads // groups * S
    cfg, _ = td.resolve_config(path, rows, dtype)
    units = B * triton.cdiv(rows, cfg.block_m) * (1 if path == "absorb" else groups)
    n = cfg.num_splits or td.choose_num_splits(units, max_len, sms, waves=cfg.waves,
                                               min_chunk=cfg.min_chunk, block_n=cfg.block_n)
    if n == 1:
        return S, 1, None, B == 1
    block_dv, split_block = td.combine_block(B, heads * S, width, n, sms)
    return S, n, (block_dv, td._pow2(n), split_block), B == 1


def plan_key(c):
    return c.s_q, c.num_splits, c.combine, c.batch == 1


SIZES = [  # path, heads, groups, width, max_batch, capacity, s_q, dtype, SMs
    ("absorb", 16, 4, 512, 128, 8192, (1, 2), torch.bfloat16, 132),
    ("gqa", 16, 4, 128, 128, 8192, (1, 2), torch.bfloat16, 132),
    ("absorb", 128, 16, 512, 64, 32768, (1, 2, 3), torch.bfloat16, 132),   # several row blocks
    ("gqa", 32, 8, 128, 40, 4096, (2, 3), torch.float32, 8),
    ("absorb", 8, 4, 32, 5, 50, (1,), torch.float32, 8),
    ("gqa", 8, 4, 24, 1, 300, (3,), torch.float16, 132),
]


@pytest.mark.parametrize("path,H,G,W,max_batch,cap,s_q,dtype,sms", SIZES)
def test_plan_covers_every_eager_batch_and_bucket_once(path, H, G, W, max_batch, cap, s_q, dtype, sms):
    calls = td.warmup_plan(path, max_batch=max_batch, s_q=s_q, heads=H, groups=G, width=W,
                           max_len=cap, dtype=dtype, sms=sms)
    keys = [plan_key(c) for c in calls]
    assert len(set(keys)) == len(keys), "a launch configuration planned twice"
    first = {}
    for S in s_q:
        for B in range(1, max_batch + 1):
            first.setdefault(launch_key(path, B, S, H, G, W, cap, dtype, sms), B)
    # exactly the configurations of the decode calls, each run at its smallest batch
    assert {k: c.batch for k, c in zip(keys, calls)} == first
    buckets = {batch_bucket(b, max_batch) for b in range(1, max_batch + 1)}
    assert all(launch_key(path, B, S, H, G, W, cap, dtype, sms) in first for B in buckets for S in s_q)
    if max_batch >= 64:
        assert len(calls) <= max_batch * len(s_q) // 2, "duplicates not removed"


@pytest.mark.parametrize("H,max_batch,cap,s_q,sms", [(32, 128, 8192, (1, 2), 132), (16, 64, 32768, (1, 2, 3), 132),
                                                     (128, 16, 4096, (1,), 78)])
def test_tilelang_plan_covers_its_combine_variants(H, max_batch, cap, s_q, sms):
    """The TileLang kernel's split calls merge with the Triton combine kernel at the TileLang
    split count: its warm-up plan gives every served (batch, s_q) a call with the same split
    count and combine constexprs, once each (a GPU test found these compiling in a decode step
    when only the Triton fallback's calls were warmed)."""
    from gqla_megatron.kernels import tilelang_decode as tld

    runs = lambda b, s: tld.prefers(b, H * s, cap, 0)  # noqa: E731
    calls = tld.warmup_plan("absorb", max_batch=max_batch, s_q=s_q, heads=H, groups=1, width=512,
                            max_len=cap, dtype=torch.bfloat16, sms=sms, runs=runs)
    keys = [plan_key(c) for c in calls]
    assert len(set(keys)) == len(keys)
    first = {}
    for S in s_q:
        for B in range(1, max_batch + 1):
            if not runs(B, S):
                continue
            n = tld.splits_for(B, H * S, cap, sms)
            combine = None if n == 1 else (*td.combine_block(B, H * S, 512, n, sms)[:1], td._pow2(n),
                                           td.combine_block(B, H * S, 512, n, sms)[1])
            first.setdefault((S, n, combine, B == 1), B)
    assert first, "no call served by TileLang at these sizes: the case tests nothing"
    assert {k: c.batch for k, c in zip(keys, calls)} == first
    with pytest.raises(ValueError, match="path"):
        tld.warmup_plan("gqa", max_batch=1, s_q=(1,), heads=H, groups=1, width=512, max_len=cap,
                        dtype=torch.bfloat16, sms=sms)


def test_plan_matches_the_decode_calls_own_plan():
    """On the interpreter's stand-in SM count (8 on CPU) the warm-up's split counts are those
    plan_decode -- what absorb_decode / gqa_decode launch with -- computes for each call."""
    for path, G, W in (("absorb", 1, 512), ("gqa", 4, 128)):
        calls = td.warmup_plan(path, max_batch=12, s_q=(1, 2), heads=16, groups=G, width=W, max_len=4096,
                               dtype=torch.bfloat16, sms=td.num_sms(CPU))
        for c in calls:
            p = td.plan_decode(path, batch=c.batch, s_q=c.s_q, heads=16, groups=G, max_len=4096,
                               dtype=torch.bfloat16, device=CPU)
            assert p.num_splits == c.num_splits


def test_plan_follows_overrides_and_skips_calls_other_kernels_serve(monkeypatch):
    from gqla_megatron.kernels import tilelang_decode as tld

    kw = dict(max_batch=128, s_q=(1, 2), heads=16, groups=1, width=512, max_len=8192,
              dtype=torch.bfloat16, sms=132)
    tl_serves = lambda b, s: tld.prefers(b, 16 * s, 8192, 0, torch.int64)  # noqa: E731
    calls = td.warmup_plan("absorb", runs=lambda b, s: not tl_serves(b, s), **kw)
    assert calls and not any(tl_serves(c.batch, c.s_q) for c in calls)
    want = {launch_key("absorb", B, S, 16, 1, 512, 8192, torch.bfloat16, 132)
            for S in (1, 2) for B in range(1, 129) if not tl_serves(B, S)}
    assert {plan_key(c) for c in calls} == want
    assert any(tl_serves(B, 2) for B in range(1, 129)) and any(tl_serves(B, 1) for B in range(1, 129))
    monkeypatch.setenv("GQLA_DECODE_ABSORB_NUM_SPLITS", "3")
    assert {c.num_splits for c in td.warmup_plan("absorb", **kw)} == {3}


@pytest.mark.parametrize("bad,field", [(dict(max_batch=0), "max_batch"), (dict(s_q=()), "s_q"),
                                       (dict(s_q=(0, 1)), "s_q"), (dict(sms=0), "sms"),
                                       (dict(path="mla"), "path")])
def test_plan_rejects_bad_sizes_naming_the_field(bad, field):
    kw = dict(path="gqa", max_batch=4, s_q=(1,), heads=8, groups=2, width=64, max_len=64,
              dtype=torch.float32, sms=8)
    with pytest.raises(ValueError, match=field):
        td.warmup_plan(**{**kw, **bad})


def engine_queries(B, S):
    """q_nope, q_rope as the engine's decode step makes them."""
    w = ref.GQLAWeights.random(CFG, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    pos = torch.arange(S)[None].expand(B, S)
    cos, sin = ref.rope_angles(pos, CFG.qk_pos_emb_head_dim, CFG.rotary_base, torch.float32)
    return ref.queries_from_latent(torch.randn(B, S, CFG.q_lora_rank), w, CFG, cos, sin)


@pytest.mark.parametrize("page", [0, 16])
@pytest.mark.parametrize("name", ["triton_absorb", "triton_gqa"])
def test_backend_warmup_runs_attend_on_the_engines_layouts(name, page, monkeypatch):
    """One attend call per planned call, each with the engine's strides: queries as the decode
    step projects them, caches (max_batch, capacity, ...) cut to the batch (or a page pool and
    an int32 block table), lengths 0 in the engine's dtype, constants as ``prepare`` makes them."""
    backend = REGISTRY[name]()
    seen = []
    monkeypatch.setattr(type(backend), "attend",
                        lambda self, prep, qn, qr, cache, lengths, cfg: seen.append((prep, qn, qr, cache, lengths)))
    max_batch, T = 5, 300
    done = backend.warmup(CFG, CPU, torch.float32, max_batch=max_batch, capacity=T, s_q=(1, 3),
                          len_dtype=torch.int64, page=page)
    W = CFG.kv_lora_rank if backend.path == "absorb" else CFG.v_head_dim
    calls = td.warmup_plan(backend.path, max_batch=max_batch, s_q=(1, 3), heads=8, groups=4, width=W,
                           max_len=T + (-T % page if page else 0), dtype=torch.float32, sms=td.num_sms(CPU))
    assert len(seen) == len(calls) and len(done) == 2 and all(f"triton {backend.path}" in d for d in done)
    w = ref.GQLAWeights.random(CFG, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    real_prep = backend.prepare(w, CFG)
    for call, (prep, qn, qr, cache, lengths) in zip(calls, seen):
        B, S = call.batch, call.s_q
        want_qn, want_qr = engine_queries(B, S)
        assert qn.shape == want_qn.shape and qn.stride() == want_qn.stride()
        assert qr.shape == want_qr.shape and qr.stride() == want_qr.stride()
        assert {k: (v.shape, v.stride()) for k, v in prep.items()} == \
               {k: (v.shape, v.stride()) for k, v in real_prep.items()}
        assert lengths.dtype == torch.int64 and lengths.shape == (B,) and not lengths.any()
        widths = ({"c": (CFG.kv_lora_rank,), "k_rope": (8,)} if backend.path == "absorb" else
                  {"k_nope": (4, 16), "v": (4, 24), "k_rope": (8,)})
        for k, tail in widths.items():
            lead = (max_batch * -(-T // page), page) if page else (B, T)
            assert cache[k].shape == lead + tail and cache[k].is_contiguous(), k
        if page:
            table = cache["block_table"]
            assert table.dtype == torch.int32 and table.shape == (B, -(-T // page))
            assert table.unique().numel() == table.numel()
        else:
            assert "block_table" not in cache


def test_backend_warmup_rejects_bad_sizes():
    backend = REGISTRY["triton_gqa"]()
    for bad, field in ((dict(max_batch=0), "max_batch"), (dict(capacity=0), "capacity"),
                       (dict(page=-1), "page")):
        kw = {**dict(max_batch=2, capacity=16, s_q=(1,), len_dtype=torch.int64), **bad}
        with pytest.raises(ValueError, match=field):
            backend.warmup(CFG, CPU, torch.float32, **kw)
