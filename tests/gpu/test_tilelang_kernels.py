"""GPU tier: the warp-specialised TileLang absorb kernel (sm_90) against the float64 reference.

Same cases as the Triton absorb kernel's test (tests/gpu/test_triton_kernels.py): LLaMA-3-8B
(h_q=32) and 128-head shapes, r=512, d_r=64, ragged lengths including 0 and capacity - s_q, s_q
1-4, contiguous caches and shuffled 64-token pages, the split heuristic plus forced 1 split
(direct write) and 7 splits (combine), outputs NaN before the call and every cache slot / page
the kernel must not use NaN too (TMA loads whole 64-token tiles, so the kernel must mask them).
Tolerance bf16 / fp16: rel_l2 <= 1e-2 and cosine >= 0.9999 (probabilities rounded to the cache
dtype before the P.V product, as in every flash kernel).
Run (GPU machine, tilelang installed): pytest -m gpu tests/gpu/test_tilelang_kernels.py
"""

import pytest
import torch

from gqla_megatron import reference as ref
from gqla_megatron.testing import BF16_COSINE, assert_close_report

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device (GPU tier)", allow_module_level=True)
if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("the TileLang absorb kernel targets sm_90 (Hopper)", allow_module_level=True)
pytest.importorskip("tilelang", reason="tilelang is not installed (pip install tilelang==0.1.15)")

from test_triton_kernels import LLAMA, B, T, _dev, _lengths, _to_paged, absorb_case  # noqa: E402

TOL = dict(rel_l2=1e-2, cos=BF16_COSINE)


# each (dtype, lengths dtype, page size, direct/split) is one TileLang compile (~10 s): bf16 with
# int32 lengths covers every shape and layout; fp16 and int64 lengths a few cases
CASES = ([(H, S, layout, torch.bfloat16, torch.int32) for H in (32, 128) for S in (1, 2, 3, 4)
          for layout in ("contiguous", "paged64", "paged128")]
         + [(32, S, "contiguous", torch.float16, torch.int32) for S in (1, 2)]
         + [(H, 2, "contiguous", torch.bfloat16, torch.int64) for H in (32, 128)])


@pytest.mark.parametrize("H,S,layout,dtype,len_dtype", CASES,
                         ids=[f"h{c[0]}-s{c[1]}-{c[2]}-{str(c[3])[6:]}-{str(c[4])[6:]}" for c in CASES])
def test_tilelang_absorb_real_shapes(H, S, layout, dtype, len_dtype):
    from gqla_megatron.kernels import tilelang_decode as tld

    q, qr, c, kr, lengths, scale, table, want = absorb_case(H, S, layout, dtype, 5000 + 1000 * S + H + len(layout),
                                                            len_dtype)
    for splits in (None, 1, 7):
        out = torch.full(want.shape, float("nan"), dtype=dtype, device=_dev())
        got = tld.absorb_decode(q, qr, c, kr, lengths, scale, block_table=table, out=out, num_splits=splits)
        torch.cuda.synchronize()
        name = f"tilelang absorb H={H} s_q={S} {layout} {dtype} splits={splits}"
        assert got is out and bool(torch.isfinite(got).all()), f"{name}: non-finite output"
        assert_close_report(name, got, want, **TOL)


def test_tilelang_absorb_rejects_small_pages():
    from gqla_megatron.kernels import tilelang_decode as tld

    g = torch.Generator().manual_seed(3)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(_dev(), torch.bfloat16)  # noqa: E731
    lengths = _lengths(1, g)
    (c, kr), table = _to_paged([mk(B, T, 512), mk(B, T, 64)], lengths, 1, 16, g)
    with pytest.raises(ValueError, match="page size 16"):
        tld.absorb_decode(mk(B, 1, 32, 512), mk(B, 1, 32, 64), c, kr, lengths, 0.1, block_table=table)


def test_tilelang_capture_in_cuda_graph_and_replay_new_inputs():
    """validate=False calls are capture-safe: one split and one direct call captured in a CUDA
    graph, then queries and lengths changed in place; each replay equals an eager call."""
    from gqla_megatron.kernels import tilelang_decode as tld

    g = torch.Generator().manual_seed(12)
    S, H, R, DR = 2, 32, 512, 64
    mk = lambda *shape: torch.randn(*shape, generator=g).to(_dev(), torch.bfloat16)  # noqa: E731
    q, qr, c, kr = mk(B, S, H, R), mk(B, S, H, DR), mk(B, T, R), mk(B, T, DR)
    lengths = _lengths(S, g).to(torch.int32)
    outs = [torch.empty_like(q), torch.empty_like(q)]

    def step():
        for out, splits in zip(outs, (None, 1)):
            tld.absorb_decode(q, qr, c, kr, lengths, 0.07, out=out, num_splits=splits, max_len=T,
                              validate=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(); step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(2):
        q.copy_(mk(B, S, H, R))
        lengths.copy_(_lengths(S, g).to(torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        for out, splits in zip(outs, (None, 1)):
            want = tld.absorb_decode(q, qr, c, kr, lengths, 0.07, num_splits=splits, max_len=T)
            assert torch.equal(out, want), f"trial {trial} splits={splits}: replay differs from eager"


def test_tilelang_backend_is_first_on_hopper_and_matches_reference():
    """bf16 on sm_90: the registry picks tilelang_absorb; its attend (W_UK / W_UV folding) at a
    size where it runs the TileLang kernel and at one where it hands over to Triton."""
    from gqla_megatron.inference.backends import select_backend
    from gqla_megatron.kernels import tilelang_decode as tld

    choice = select_backend("absorb", LLAMA, _dev(), torch.bfloat16)
    assert choice.backend.name == "tilelang_absorb", choice.rejected
    assert select_backend("absorb", LLAMA, _dev(), torch.float32).backend.name == "triton_absorb"
    g = torch.Generator().manual_seed(13)
    cfg = LLAMA
    w = ref.GQLAWeights.random(cfg, generator=g, dtype=torch.float32).to(device=_dev())
    be = choice.backend
    prep = be.prepare(w.to(torch.bfloat16), cfg)
    for Bn, Tn in ((8, tld.MIN_TOKENS // 8 + 64), (2, 300)):
        assert tld.prefers(Bn, 2 * cfg.num_attention_heads, Tn, 0) == (Bn * Tn >= tld.MIN_TOKENS)
        S, H = 2, cfg.num_attention_heads
        mk = lambda *shape: torch.randn(*shape, generator=g).to(_dev())  # noqa: E731
        q_nope, q_rope = mk(Bn, S, H, cfg.qk_head_dim), mk(Bn, S, H, cfg.qk_pos_emb_head_dim)
        c, kr = mk(Bn, Tn, cfg.kv_lora_rank), mk(Bn, Tn, cfg.qk_pos_emb_head_dim)
        lengths = torch.randint(0, Tn - S + 1, (Bn,), generator=g).to(_dev())
        k_nope, v = ref.expand_latent(c, w, cfg)
        q_pos = lengths[:, None] + torch.arange(S, device=_dev())[None]
        allowed = ref._causal_mask(S, Tn, q_pos, torch.arange(Tn, device=_dev()))
        want = ref._attend_groups(q_nope.double(), q_rope.double(), k_nope.double(), kr.double(),
                                  v.double(), allowed, cfg.softmax_scale, cfg.heads_per_group)
        bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
        got = be.attend(prep, bf(q_nope), bf(q_rope), {"c": bf(c), "k_rope": bf(kr)}, lengths, cfg)
        # bf16 weights, queries and caches against the fp64 maths on the fp32 values
        assert_close_report(f"tilelang_absorb attend B={Bn} T={Tn}", got, want, rel_l2=3e-2, cos=0.999)
