#!/usr/bin/env bash
# Set up (if needed) and run the CPU test tiers: unit (GPU tests skip with a reason), then the
# multi-process tier under torchrun (4 gloo ranks: TP/SP/PP/MTP parity, checkpoint resharding,
# Megatron GQA TP2xPP2 -> gqla-convert -> GQLA loaded at TP1/TP4;
# 8 ranks: tensor-parallel decoding at TP 1/2/4/8).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -q -rs tests/cpu tests/gpu
timeout 1500 .venv/bin/torchrun --standalone --nproc_per_node 4 \
    -m pytest -q -m dist -p no:cacheprovider tests/dist/test_parallel.py tests/dist/test_convert_tp.py
timeout 600 .venv/bin/torchrun --standalone --nproc_per_node 8 \
    -m pytest -q -m dist -p no:cacheprovider tests/dist/test_engine_tp.py
