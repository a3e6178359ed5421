"""Named run recipes: a run is reproducible from its name (plus the flags it overrides).

Each recipe is a dict of defaults for the ``gqla-pretrain`` flags (Megatron-LM names with
dashes turned into underscores). Model shapes are GQLA's; ``--attention mla|gqa`` trains the
same-shape baseline (MLA: one up-projection per head, g = h_q; GQA: g KV heads of head dim
``qk_head_dim``, RoPE on the whole head, no latent).
"""

from __future__ import annotations

import copy

_TRAIN = dict(lr_warmup_iters=100, weight_decay=0.1, clip_grad=1.0, adam_beta1=0.9,
              adam_beta2=0.95, log_interval=10, save_interval=1000, seed=1234)

RECIPES = {
    # CPU, seconds: the embedded default used by the README and the tests.
    "tiny_cpu": dict(
        _TRAIN, num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
        num_query_groups=4, kv_lora_rank=32, q_lora_rank=None, qk_head_dim=16,
        qk_pos_emb_head_dim=8, v_head_dim=16, vocab_size=256, seq_length=64,
        micro_batch_size=2, global_batch_size=8, lr=3e-3, min_lr=3e-4, lr_warmup_iters=2,
        train_iters=20, bf16=False, transformer_impl="local", log_interval=1, save_interval=10),
    # ~125M (GPT-2 small body, SmolLM2 vocabulary), one H200.
    "gqla_125m": dict(
        _TRAIN, num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12,
        num_query_groups=4, kv_lora_rank=256, q_lora_rank=None, qk_head_dim=64,
        qk_pos_emb_head_dim=32, v_head_dim=64, vocab_size=49152, seq_length=2048,
        micro_batch_size=8, global_batch_size=64, lr=6e-4, min_lr=6e-5, train_iters=2000,
        bf16=True, transformer_impl="transformer_engine"),
    # ~1.2B: the shape of ../shared/docs/baselines.md (hidden 2048, 24 layers, 16 heads,
    # SwiGLU 5632, seq 4096, micro-batch 2), GQLA with g = 4, r = 512, d_n = d_v = 128, d_r = 64.
    "gqla_1b": dict(
        _TRAIN, num_layers=24, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
        num_query_groups=4, kv_lora_rank=512, q_lora_rank=None, qk_head_dim=128,
        qk_pos_emb_head_dim=64, v_head_dim=128, vocab_size=49152, seq_length=4096,
        micro_batch_size=2, global_batch_size=16, lr=3e-4, min_lr=3e-5, train_iters=2000,
        bf16=True, transformer_impl="transformer_engine"),
    # LLaMA-3-8B shapes with GQLA attention (h_q 32, g 8, r 512): the paper's 28.125 % cache.
    "gqla_8b_shape": dict(
        _TRAIN, num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, kv_lora_rank=512, q_lora_rank=None, qk_head_dim=128,
        qk_pos_emb_head_dim=64, v_head_dim=128, vocab_size=128256, seq_length=8192,
        micro_batch_size=1, global_batch_size=128, lr=3e-4, min_lr=3e-5, train_iters=10000,
        bf16=True, transformer_impl="transformer_engine", tensor_model_parallel_size=8,
        sequence_parallel=True),
}


def get_recipe(name: str) -> dict:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return copy.deepcopy(RECIPES[name])
