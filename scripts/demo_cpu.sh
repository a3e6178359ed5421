#!/usr/bin/env bash
# Set up (if needed) and run the quickstart on the embedded tiny GQLA model, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
exec .venv/bin/python examples/quickstart_cpu.py "$@"
