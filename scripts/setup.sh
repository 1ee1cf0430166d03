#!/usr/bin/env bash
# Create .venv (once) and install what the scripts need; `--test` adds the test packages.
# torch is installed first as the pinned 2.13.0 (override with TORCH_SPEC), so that
# requirements.txt's open range is already satisfied and pulls nothing newer.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
  echo "error: Python 3.10 to 3.12 is needed (texar-pytorch needs numpy<2, torch 2.13 needs >= 3.10); set PYTHON=python3.11 or similar" >&2
  exit 2
fi
# A venv whose creation failed half-way (no ensurepip) has a python but no pip.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  if ! "$python" -m venv --clear .venv; then
    echo "error: could not create .venv: install your Python's venv module (Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 2
  fi
fi
. .venv/bin/activate
export PIP_USER=0  # a user-wide 'user = true' in pip.conf cannot install into a venv
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
requirements=(-r requirements.txt)
if [ "${1:-}" = "--test" ]; then
  requirements+=(-r requirements-test.txt)
fi
python -m pip install -q "${requirements[@]}"
