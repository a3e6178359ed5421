#!/usr/bin/env bash
# Set up (if needed), then on the embedded tiny GQLA model, on CPU: (1) prefill + both decode
# paths against Megatron's forward with cache bytes per token, (2) pretrain -> checkpoint ->
# gqla-serve on the auto-chosen path and on both forced paths.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
.venv/bin/python examples/quickstart_cpu.py "$@"
echo
bash examples/end_to_end_cpu.sh
