"""GQLA self-attention for Megatron-Core, plus the two small modules its local spec needs.

Shape legend (Megatron style): s = sequence, b = batch, n = local query heads (h_q/TP),
g = local KV groups (g/TP), qk = d_n, pos = d_r, v = d_v, r = kv_lora_rank.

``GQLASelfAttention`` is Megatron's ``MLASelfAttention`` with one change of weights and two
changes of behaviour:
  * ``linear_kv_up_proj`` has g*(d_n+d_v) outputs (one [K;V] block per group, group-major)
    instead of h_q*(d_n+d_v); it is column-parallel, so each TP rank holds g/TP whole groups,
    exactly the KV groups its h_q/TP contiguous query heads use;
  * keys and values are built with g/TP heads and core attention runs as GQA (TE
    ``DotProductAttention`` through ``num_gqa_groups``; ``GQLADotProductAttention`` locally);
  * the shared RoPE key's gradient is reduced over TP. Every rank uses the full k_pos_emb for
    its own groups only, so without a reduction each rank's gradient of the RoPE rows of
    ``linear_kv_down_proj`` (and through it of the input norm) is a partial sum. This is
    upstream NVIDIA/Megatron-LM#1699, which Megatron's MLA still has in 0.16.1.
Everything else (down-projections, norms, RoPE/YaRN modules, output projection, static KV
cache, recompute of the up-projection) is inherited unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings import apply_rotary_pos_emb
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
)
from megatron.core.transformer.spec_utils import build_module
from megatron.core.utils import deprecate_inference_params, get_pg_size

from gqla_megatron.megatron.config import validate_gqla_transformer_config

try:  # Triton kernels (GPU only); they take the head count from the tensor shape.
    from megatron.core.fusions.fused_mla_yarn_rope_apply import (
        fused_apply_mla_rope_for_kv,
        fused_apply_mla_rope_for_q,
    )
except Exception:  # pragma: no cover - no triton on CPU
    fused_apply_mla_rope_for_kv = fused_apply_mla_rope_for_q = None


class GQLASelfAttention(MLASelfAttention):
    """Group-Query Latent Attention (see module docstring). Input/output [s, b, h]."""

    def __init__(
        self,
        config,
        submodules: MLASelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type=AttnMaskType.padding,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        gqla = validate_gqla_transformer_config(config)
        super().__init__(config, submodules, layer_number, attn_mask_type=attn_mask_type,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.gqla = gqla
        # MLASelfAttention built a per-head up-projection; replace it by the per-group one.
        self.linear_kv_up_proj = build_module(
            submodules.linear_kv_up_proj,
            config.kv_lora_rank,
            config.num_query_groups * (config.qk_head_dim + config.v_head_dim),
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name='kv_up_proj',
            tp_group=self.pg_collection.tp,
        )
        if config.apply_rope_fusion and fused_apply_mla_rope_for_q is None:
            raise ValueError("apply_rope_fusion needs Megatron's Triton MLA RoPE kernels "
                             "(triton + CUDA); set apply_rope_fusion=False")

    # ------------------------------------------------------------------------------------
    def get_query_key_value_tensors(
        self,
        hidden_states,
        key_value_states=None,
        position_ids=None,
        packed_seq_params=None,
        inference_context=None,
        *,
        inference_params=None,
    ):
        """query [s, b, n, qk+pos], key [s, b, g, qk+pos], value [s, b, g, v]; plus the
        compressed q and kv (returned for Megatron's interface)."""
        cfg = self.config
        inference_context = deprecate_inference_params(inference_context, inference_params)
        if packed_seq_params is not None:
            raise NotImplementedError("GQLASelfAttention does not support packed (THD) sequences yet")
        if inference_context is not None and not inference_context.is_static_batching():
            raise NotImplementedError("GQLASelfAttention supports Megatron's static inference "
                                      "context only; use gqla_megatron's decode engine")
        qk, pos, v = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
        tp_size = get_pg_size(self.tp_group)

        # ---- RoPE tables -----------------------------------------------------------------
        rotary_seq_len = self.rotary_pos_emb.get_rotary_seq_len(
            inference_context, None, hidden_states, cfg, packed_seq_params)
        mscale, cos, sin = 1.0, None, None
        if cfg.rope_type == "rope":
            rotary_pos_emb = self.rotary_pos_emb(rotary_seq_len)
        elif cfg.apply_rope_fusion:
            cos, sin = self.rotary_pos_emb.get_cached_cos_sin(rotary_seq_len, dtype=hidden_states.dtype)
            rotary_pos_emb = None
        else:
            rotary_pos_emb, mscale = self.rotary_pos_emb(rotary_seq_len)

        # ---- down-projections and latent norms ---------------------------------------------
        if cfg.q_lora_rank is not None:
            q_compressed, _ = self.linear_q_down_proj(hidden_states)
            if q_compressed.size(-1) != cfg.q_lora_rank:  # column-parallel (local spec)
                q_compressed = gather_from_tensor_model_parallel_region(q_compressed, group=self.tp_group)
                if cfg.sequence_parallel:
                    q_compressed = scatter_to_sequence_parallel_region(q_compressed, group=self.tp_group)
            q_compressed = self.q_layernorm(q_compressed)
        else:
            q_compressed = hidden_states

        kv_combined, _ = self.linear_kv_down_proj(hidden_states)
        rope_grad_is_reduced = False
        if kv_combined.size(-1) != cfg.kv_lora_rank + pos:
            # column-parallel down-projection (local spec): [s, b, (r+pos)/TP] -> [s, b, r+pos]
            kv_combined = gather_from_tensor_model_parallel_region(kv_combined, group=self.tp_group)
            kv_compressed, k_pos_emb = torch.split(kv_combined, [cfg.kv_lora_rank, pos], dim=-1)
            if cfg.sequence_parallel:
                kv_compressed = scatter_to_sequence_parallel_region(kv_compressed, group=self.tp_group)
        else:
            # replicated down-projection (TE spec, parallel_mode='duplicated')
            kv_compressed, k_pos_emb = torch.split(kv_combined, [cfg.kv_lora_rank, pos], dim=-1)
            if tp_size > 1 and cfg.sequence_parallel:
                # backward is a reduce-scatter over TP: the gradient is summed already
                k_pos_emb = gather_from_sequence_parallel_region(k_pos_emb, group=self.tp_group)
                rope_grad_is_reduced = True
        if tp_size > 1 and not rope_grad_is_reduced:
            # identity forward, all-reduce backward (fix for NVIDIA/Megatron-LM#1699)
            k_pos_emb = copy_to_tensor_model_parallel_region(k_pos_emb, group=self.tp_group)
        kv_compressed = self.kv_layernorm(kv_compressed)

        # ---- up-projections and RoPE ------------------------------------------------------
        def up_proj_and_rope(q_compressed, kv_compressed, k_pos_emb, rotary_pos_emb):
            if cfg.q_lora_rank is not None:
                q, _ = self.linear_q_up_proj(q_compressed)
            else:
                q, _ = self.linear_q_proj(q_compressed)
            q = q.view(*q.shape[:-1], self.num_attention_heads_per_partition, qk + pos)
            kv, _ = self.linear_kv_up_proj(kv_compressed)
            kv = kv.view(*kv.shape[:-1], self.num_query_groups_per_partition, qk + v)
            k_pos_emb = k_pos_emb.unsqueeze(-2)                      # [s, b, 1, pos]
            if cfg.apply_rope_fusion:
                cp = self.pg_collection.cp
                query = fused_apply_mla_rope_for_q(q, cos, sin, qk, pos, None, cp.rank(), cp.size())
                key, value = fused_apply_mla_rope_for_kv(
                    kv, k_pos_emb, cos, sin, pos, qk, v, None, cp.rank(), cp.size())
                return query, key, value
            q_len = q.size(0)
            if inference_context is not None:
                start = inference_context.sequence_len_offset
                rotary_pos_emb = rotary_pos_emb[start:start + q_len]
            else:
                rotary_pos_emb = rotary_pos_emb[:q_len]
            q_no_pe, q_pos_emb = torch.split(q, [qk, pos], dim=-1)
            k_no_pe, value = torch.split(kv, [qk, v], dim=-1)
            rope_kw = dict(config=cfg, cu_seqlens=None, mscale=mscale, cp_group=self.pg_collection.cp)
            q_pos_emb = apply_rotary_pos_emb(q_pos_emb, rotary_pos_emb, **rope_kw)
            k_pos_emb = apply_rotary_pos_emb(k_pos_emb, rotary_pos_emb, **rope_kw)
            query = torch.cat([q_no_pe, q_pos_emb], dim=-1)
            # the ONE shared RoPE key goes into each local group's K head (a broadcast view)
            key = torch.cat([k_no_pe, k_pos_emb.expand(-1, -1, self.num_query_groups_per_partition, -1)],
                            dim=-1)
            return query.contiguous(), key.contiguous(), value.contiguous()

        if self.recompute_up_proj:
            quantization = cfg.fp8 or cfg.fp4
            self.qkv_up_checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=quantization)
            query, key, value = self.qkv_up_checkpoint.checkpoint(
                up_proj_and_rope, q_compressed, kv_compressed, k_pos_emb, rotary_pos_emb)
        else:
            query, key, value = up_proj_and_rope(q_compressed, kv_compressed, k_pos_emb, rotary_pos_emb)
        return query, key, value, q_compressed, kv_compressed

    # Megatron's absorption helpers assume per-head up-projections and TE; refuse them loudly.
    def prepare_for_absorption(self):
        raise NotImplementedError("GQLA absorbs per group: use gqla_megatron's decode paths")

    def clip_qk(self):
        raise NotImplementedError("qk_clip assumes per-head K up-projections; not supported by GQLA")


class GQLADotProductAttention(DotProductAttention):
    """Megatron's local (non-TE) core attention, accepting distinct K and V head dims.

    Megatron's ``DotProductAttention`` rejects the ``k_channels``/``v_channels`` arguments MLA
    passes (upstream NVIDIA/Megatron-LM#1589) and sizes its output by ``kv_channels``. This
    subclass takes both, sizes the output by ``v_channels``, and builds the causal mask on the
    input's device when none is given (Megatron's default mask is created on 'cuda').
    GQA (g KV heads for h_q query heads) is handled by the parent's repeat_interleave.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, k_channels=None, v_channels=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is None and mask_type == AttnMaskType.causal:
            sq, sk = query.size(0), key.size(0)
            attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).triu(
                diagonal=1 + sk - sq)[None, None]
        return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                               attention_bias=attention_bias, packed_seq_params=packed_seq_params)


class SPTorchNorm:
    """torch LayerNorm/RMSNorm for the local spec that also works with sequence parallel.

    Megatron's ``WrappedTorchNorm`` asserts under sequence parallel, although all SP needs is
    the ``sequence_parallel`` attribute on the norm's parameters (so that
    ``finalize_model_grads`` sums their gradients over the TP group). This sets it.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the local (torch) norm")
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization must be one of {sorted(norms)}, got {config.normalization!r}")
        norm = norms[config.normalization](hidden_size, eps=eps)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))
        return norm
