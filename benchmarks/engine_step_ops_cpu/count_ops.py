"""Torch ops per decode step of the engine (CPU, torch backends, tiny 4-layer model).

    python benchmarks/engine_step_ops_cpu/count_ops.py

Counts, under torch.profiler, the top-level aten ops of one `bench_step` (ops not called from
inside another aten op), minus view-like, allocation and dtype-query ops: each is one kernel
launch or more. Composite ops count once (einsum; F.rms_norm, whose aten::_fused_rms_norm runs
~6 element-wise ops on CPU). A proxy for the GPU step's kernel count: on the GPU the attention
ops are the Triton backends' 1-3 kernels instead of these einsums."""
import torch
from collections import Counter
from torch.profiler import profile, ProfilerActivity
from gqla_megatron.config import GQLAConfig
from gqla_megatron.testing import random_model_weights
from gqla_megatron.inference.engine import GQLAEngine
from gqla_megatron.roofline import get_device
VIEWS = {"aten::unsqueeze", "aten::slice", "aten::view", "aten::numpy_T", "aten::split_with_sizes",
         "aten::split", "aten::chunk", "aten::unflatten", "aten::flatten", "aten::expand", "aten::transpose",
         "aten::select", "aten::as_strided", "aten::t", "aten::detach", "aten::alias", "aten::lift_fresh",
         "aten::_unsafe_view", "aten::permute", "aten::squeeze", "aten::narrow", "aten::unbind", "aten::reshape",
         "aten::to", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resolve_conj",
         "aten::resolve_neg", "aten::result_type"}
cfg = GQLAConfig(hidden_size=256, num_attention_heads=8, num_query_groups=4, kv_lora_rank=64,
                 qk_head_dim=32, qk_pos_emb_head_dim=16, v_head_dim=32, q_lora_rank=96)
L = 4
mw = random_model_weights(cfg, vocab=100, layers=L, seed=0)
for path in ("absorb", "gqa"):
    eng = GQLAEngine(mw, cfg, decode_path=path, max_batch=4, max_seq_len=256, device_spec=get_device("H100"),
                     decode_backend=f"torch_{path}")
    st = eng.fill_random_context(4, 100)
    eng.bench_step(st)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.bench_step(st)
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    # an aten::to / reshape that copies shows its copy_ child; count those children instead
    kernels = [e for e in top if e.name not in VIEWS]
    kernels += [c for e in top if e.name in VIEWS for c in e.cpu_children if c.name in ("aten::copy_", "aten::_to_copy", "aten::clone")]
    c = Counter(e.name for e in kernels)
    print(f"{path}: {len(kernels)} kernel-launching ops per step ({len(kernels) / L:.1f} per layer); "
          f"{dict(c.most_common(12))}")
