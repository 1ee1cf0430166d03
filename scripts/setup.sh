#!/usr/bin/env bash
# Create .venv (once) and install what the scripts need; `--test` adds the test packages.
# torch is installed first as the pinned CPU-friendly 2.13.0 (override with TORCH_SPEC),
# so that requirements.txt's open range is already satisfied and pulls nothing larger.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
requirements=(-r requirements.txt)
if [ "${1:-}" = "--test" ]; then
  requirements+=(-r requirements-test.txt)
fi
pip install -q "${requirements[@]}"
