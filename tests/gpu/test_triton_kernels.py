"""GPU tier: the Triton decode kernels at real shapes against the float64 reference, and the
engine choosing them.

Shapes: LLaMA-3-8B GQLA (h_q=32, g=8, r=512, d_r=64, d_n=d_v=128) on both paths, and the
128-head absorb shape (DeepSeek-like h_q=128, r=512, d_r=64). Every case: fresh random inputs,
ragged lengths (including 0 and capacity - s_q), s_q 1-4, contiguous and paged caches (page 64
= one tile per page, and page 16 < the KV tile, shuffled page ids), the default split heuristic
plus forced 1 split (direct write) and 7 splits (combine), outputs filled with NaN before the
call and unused cache slots / pages NaN too.

Tolerances (relative L2 error vs float64 attention on the same rounded inputs):
  fp32  rel_l2 <= 1e-5   IEEE fp32 dots and fp32 softmax; exp2 is the hardware approximation
                          (~2 ulp), and the sums run in another order than the reference
  bf16  rel_l2 <= 1e-2, cosine >= 0.9999   probabilities rounded to bf16 before the PV product
                          (as in every flash kernel) and a bf16 output
Run: pytest -m gpu tests/gpu/test_triton_kernels.py
"""

import dataclasses

import pytest
import torch

from gqla_megatron import reference as ref
from gqla_megatron.config import GQLAConfig
from gqla_megatron.testing import BF16_COSINE, assert_close_report

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[kernels])")

TOL = {torch.float32: dict(rel_l2=1e-5), torch.bfloat16: dict(rel_l2=1e-2, cos=BF16_COSINE)}
LLAMA = GQLAConfig(hidden_size=4096, num_attention_heads=32, num_query_groups=8, kv_lora_rank=512,
                   qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128)
B, T = 5, 1100          # ragged lengths up to T - s_q; several KV tiles and splits per sequence


def _dev():
    return torch.device("cuda")


def _lengths(S, g):
    lens = torch.randint(0, T - S + 1, (B,), generator=g)
    lens[0], lens[-1] = 0, T - S
    return lens.to(_dev())


def _poison_beyond(cache_BT, lengths, S):
    dead = torch.arange(cache_BT.shape[1], device=cache_BT.device)[None, :] >= (lengths + S)[:, None]
    cache_BT[dead] = float("nan")


def _to_paged(caches, lengths, S, page, g):
    """Contiguous (B, T, ...) caches -> shuffled pages of NaN pools + block table; unused table
    entries point at a spare NaN page."""
    per_seq = -(-T // page)
    n_pages = B * per_seq + 1
    perm = torch.randperm(n_pages, generator=g).to(_dev())
    table = perm[: B * per_seq].view(B, per_seq).to(torch.int32).contiguous()
    pools = []
    for c in caches:
        padded = torch.full((B, per_seq * page) + tuple(c.shape[2:]), float("nan"), dtype=c.dtype, device=c.device)
        padded[:, :T] = c
        pool = torch.full((n_pages, page) + tuple(c.shape[2:]), float("nan"), dtype=c.dtype, device=c.device)
        pool[table.long().flatten()] = padded.view(B * per_seq, page, *c.shape[2:])
        pools.append(pool)
    used = -(-(lengths + S) // page)
    table[torch.arange(per_seq, device=_dev())[None, :] >= used[:, None]] = int(perm[-1])
    return pools, table


def _allowed(lengths, S):
    q_pos = lengths[:, None] + torch.arange(S, device=_dev())[None]
    return ref._causal_mask(S, T, q_pos, torch.arange(T, device=_dev()))


def absorb_case(H, S, layout, dtype, seed, len_dtype=torch.int64):
    """Inputs of one absorb-kernel case (r=512, d_r=64; the module doc lists what they cover) and
    the float64 answer: (q, q_rope, c, k_rope, lengths, scale, block_table or None, want)."""
    g = torch.Generator().manual_seed(seed)
    R, DR = 512, 64
    mk = lambda *shape: torch.randn(*shape, generator=g).to(_dev(), dtype)  # noqa: E731
    q, qr, c, kr = mk(B, S, H, R), mk(B, S, H, DR), mk(B, T, R), mk(B, T, DR)
    lengths = _lengths(S, g).to(len_dtype)
    scale = LLAMA.softmax_scale
    want = ref._attend_groups(q.double(), qr.double(), c.double()[:, :, None], kr.double(),
                              c.double()[:, :, None], _allowed(lengths, S), scale, H)
    _poison_beyond(c, lengths, S)
    _poison_beyond(kr, lengths, S)
    table = None
    if layout != "contiguous":
        (c, kr), table = _to_paged([c, kr], lengths, S, int(layout[5:]), g)
    return q, qr, c, kr, lengths, scale, table, want


CONFIGS = [None, dict(num_splits=1), dict(num_splits=7)]
LAYOUTS = ["contiguous", "paged64", "paged16"]


def _run_all(fn, want, dtype, name):
    from gqla_megatron.kernels import triton_decode as td

    for extra in CONFIGS:
        out = torch.full(want.shape, float("nan"), dtype=dtype, device=_dev())
        cfg = td.DecodeKernelConfig(**extra) if extra else None
        got = fn(out, cfg)
        torch.cuda.synchronize()
        assert got is out and bool(torch.isfinite(got).all()), f"{name} {extra}: non-finite output"
        assert_close_report(f"{name} {extra}", got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("S", [1, 2, 3, 4])
@pytest.mark.parametrize("H", [32, 128], ids=["h32", "h128"])
def test_absorb_kernel_real_shapes(H, S, layout, dtype):
    from gqla_megatron.kernels import triton_decode as td

    q, qr, c, kr, lengths, scale, table, want = absorb_case(H, S, layout, dtype, 1000 * S + H + len(layout))
    _run_all(lambda out, cfg: td.absorb_decode(q, qr, c, kr, lengths, scale, block_table=table,
                                               out=out, config=cfg),
             want, dtype, f"absorb H={H} s_q={S} {layout} {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("S", [1, 2, 3, 4])
def test_gqa_kernel_real_shapes(S, layout, dtype):
    from gqla_megatron.kernels import triton_decode as td

    g = torch.Generator().manual_seed(77 * S + len(layout))
    H, G, DN, DR, DV = 32, 8, 128, 64, 128
    mk = lambda *shape: torch.randn(*shape, generator=g).to(_dev(), dtype)  # noqa: E731
    qn, qr = mk(B, S, H, DN), mk(B, S, H, DR)
    kn, v, kr = mk(B, T, G, DN), mk(B, T, G, DV), mk(B, T, DR)
    lengths = _lengths(S, g)
    scale = LLAMA.softmax_scale
    want = ref._attend_groups(qn.double(), qr.double(), kn.double(), kr.double(), v.double(),
                              _allowed(lengths, S), scale, H // G)
    for t in (kn, v, kr):
        _poison_beyond(t, lengths, S)
    table = None
    if layout != "contiguous":
        (kn, v, kr), table = _to_paged([kn, v, kr], lengths, S, int(layout[5:]), g)
    _run_all(lambda out, cfg: td.gqa_decode(qn, qr, kn, v, kr, lengths, scale, block_table=table,
                                            out=out, config=cfg),
             want, dtype, f"gqa s_q={S} {layout} {dtype}")


def test_backends_attend_matches_reference_real_shapes():
    """triton_absorb / triton_gqa attend() (W_UK / W_UV folding included) vs the reference."""
    from gqla_megatron.inference.backends import select_backend

    g = torch.Generator().manual_seed(5)
    cfg = LLAMA
    w = ref.GQLAWeights.random(cfg, generator=g, dtype=torch.float32).to(device=_dev())
    S, H = 2, cfg.num_attention_heads
    q_nope = torch.randn(B, S, H, cfg.qk_head_dim, generator=g).to(_dev())
    q_rope = torch.randn(B, S, H, cfg.qk_pos_emb_head_dim, generator=g).to(_dev())
    c = torch.randn(B, T, cfg.kv_lora_rank, generator=g).to(_dev())
    kr = torch.randn(B, T, cfg.qk_pos_emb_head_dim, generator=g).to(_dev())
    lengths = _lengths(S, g)
    k_nope, v = ref.expand_latent(c, w, cfg)
    want = ref._attend_groups(q_nope.double(), q_rope.double(), k_nope.double(), kr.double(),
                              v.double(), _allowed(lengths, S), cfg.softmax_scale, cfg.heads_per_group)
    caches = {"absorb": {"c": c, "k_rope": kr},
              "gqa": {"k_nope": k_nope.contiguous(), "v": v.contiguous(), "k_rope": kr}}
    for path in ("absorb", "gqa"):
        choice = select_backend(path, cfg, _dev(), torch.float32)
        assert choice.backend.name == f"triton_{path}", choice.rejected
        be = choice.backend
        got = be.attend(be.prepare(w, cfg), q_nope, q_rope, caches[path], lengths, cfg)
        assert_close_report(f"triton_{path} attend", got, want, rel_l2=1e-5)


@pytest.mark.parametrize("path", ["absorb", "gqa"])
def test_engine_auto_picks_triton_same_greedy_tokens(path):
    from gqla_megatron.inference.engine import GQLAEngine, SamplingParams
    from gqla_megatron.roofline import get_device
    from gqla_megatron.testing import random_model_weights

    cfg = dataclasses.replace(LLAMA, hidden_size=512)
    mw = random_model_weights(cfg, vocab=256, layers=2, seed=3)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]
    res = {}
    for backend in ("auto", f"torch_{path}"):
        eng = GQLAEngine(mw, cfg, decode_path=path, max_batch=3, max_seq_len=96, device="cuda",
                         dtype=torch.float32, device_spec=get_device("H200"), decode_backend=backend)
        if backend == "auto":
            assert eng.backend.name == f"triton_{path}", eng.rejected_backends
        res[backend] = eng.generate(prompts, SamplingParams(max_new_tokens=24))
    for a, b in zip(res["auto"], res[f"torch_{path}"]):
        assert a.tokens == b.tokens
        assert (a.logits - b.logits).abs().max() <= 1e-3


@pytest.mark.parametrize("path", ["absorb", "gqa"])
@pytest.mark.parametrize("num_splits", [None, 1], ids=["split", "direct"])
def test_kernels_capture_in_cuda_graph_and_replay_new_inputs(path, num_splits):
    """The wrappers (validate=False) are capture-safe: one call captured in a CUDA graph, then
    queries and lengths changed in place; each replay equals an eager call on the new values."""
    from gqla_megatron.kernels import triton_decode as td

    g = torch.Generator().manual_seed(11)
    S, H, G, R, DR, DN = 2, 32, 8, 512, 64, 128
    mk = lambda *shape: torch.randn(*shape, generator=g).to(_dev(), torch.bfloat16)  # noqa: E731
    lengths = _lengths(S, g)
    cfg = td.DecodeKernelConfig(num_splits=num_splits) if num_splits else None
    if path == "absorb":
        q, qr, c, kr = mk(B, S, H, R), mk(B, S, H, DR), mk(B, T, R), mk(B, T, DR)
        call = lambda out: td.absorb_decode(q, qr, c, kr, lengths, 0.1, out=out, config=cfg,  # noqa: E731
                                            max_len=T, validate=False)
        out = torch.empty(B, S, H, R, dtype=torch.bfloat16, device=_dev())
    else:
        q, qr = mk(B, S, H, DN), mk(B, S, H, DR)
        kn, v, kr = mk(B, T, G, DN), mk(B, T, G, DN), mk(B, T, DR)
        call = lambda out: td.gqa_decode(q, qr, kn, v, kr, lengths, 0.1, out=out, config=cfg,  # noqa: E731
                                         max_len=T, validate=False)
        out = torch.empty(B, S, H, DN, dtype=torch.bfloat16, device=_dev())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(out)
        call(out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(out)
    for step in range(3):
        q.copy_(mk(*q.shape))
        qr.copy_(mk(*qr.shape))
        lengths.copy_(_lengths(S, g))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = call(torch.empty_like(out))
        assert bool(torch.isfinite(out).all()), f"{path} replay {step}: non-finite"
        assert torch.equal(out, want), f"{path} replay {step} differs from the eager call"


@pytest.mark.parametrize("kernel", ["triton", "tilelang"])
def test_combine_discard_option_same_results(kernel, monkeypatch):
    """GQLA_DECODE_COMBINE_DISCARD (the combine drops the partials' L2 lines after reading them):
    split calls on two input sets in turn, twice (a discard before the reads had finished would
    leave the other set's stale partials to read) match float64 and equal the default bitwise."""
    from gqla_megatron.kernels import triton_decode as td

    if kernel == "triton":
        run = td.absorb_decode
    else:
        from gqla_megatron.kernels import tilelang_decode as tld

        problems = tld.absorb_problems(_dev(), torch.bfloat16, kv_lora_rank=512, rope_dim=64)
        if problems:
            pytest.skip("; ".join(problems))
        run = tld.absorb_decode
    cases = [absorb_case(32, 1, "contiguous", torch.bfloat16, seed, len_dtype=torch.int32) for seed in (11, 12)]

    def call(case, discard):
        monkeypatch.setattr(td, "COMBINE_DISCARD", discard)
        q, qr, c, kr, lengths, scale, _, _ = case
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=_dev())
        kw = dict(config=td.DecodeKernelConfig(num_splits=7)) if kernel == "triton" else dict(num_splits=7)
        run(q, qr, c, kr, lengths, scale, out=out, **kw)
        torch.cuda.synchronize()
        return out

    keep = [call(case, False) for case in cases]
    for _ in range(2):
        for case, want_bits in zip(cases, keep):
            got = call(case, True)
            assert torch.equal(got, want_bits), f"{kernel}: discard changed the result"
            assert_close_report(f"{kernel} discard", got, case[-1], **TOL[torch.bfloat16])
