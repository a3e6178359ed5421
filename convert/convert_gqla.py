"""Thin launcher for gqla_megatron.conversion.cli (``gqla-convert``; one process, no torchrun):

    # SmolLM2 GGUF -> Megatron GQA checkpoint (+ tokenizer.json), then TransGQLA to r = 256:
    python convert/convert_gqla.py import-gguf --gguf smollm2 --save runs/smollm2_gqa
    python convert/convert_gqla.py gqa-to-gqla --load runs/smollm2_gqa --save runs/smollm2_gqla_r256 \\
        --kv-lora-rank 256 --qk-pos-emb-head-dim 32 --freqfold 4 --calib-pydocs --calib-samples 4 \\
        --eval-pydocs
    # a gqla-pretrain --attention gqa run (any TP/PP, torch_dist or legacy), PCA on the GPU,
    # checkpoint meant for TP 8:
    python convert/convert_gqla.py gqa-to-gqla --load /ckpt/gqa8b --save /ckpt/gqla8b \\
        --kv-lora-rank 512 --qk-pos-emb-head-dim 64 --freqfold 2 --calib-data data/corpus_text_document \\
        --device cuda --target-tensor-model-parallel-size 8
    # GQLA checkpoint -> HF safetensors (DeepSeek-V3 MLA layout for stock MLA servers):
    python convert/convert_gqla.py export-hf --load runs/smollm2_gqla_r256 --save hf/out --layout deepseek_v3
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gqla_megatron.conversion.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
