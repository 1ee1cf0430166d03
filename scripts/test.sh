#!/usr/bin/env bash
# Set everything up (scripts/setup.sh --test) and run the whole test suite on both cores.
# OpenMPI (for the mpirun launch test) is installed with apt-get when it is missing
# and we are root; otherwise that one test skips and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
if ! command -v mpirun >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing openmpi-bin for the mpirun test..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends openmpi-bin >/dev/null) \
      || echo "could not install openmpi-bin: the mpirun test will skip"
  else
    echo "mpirun not found (apt-get install openmpi-bin): the mpirun test will skip"
  fi
fi
. .venv/bin/activate
# Two workers (pytest-xdist), one per core; each torch process then uses one
# thread, so the two do not fight over the cores. PYTEST_WORKERS=0 runs in
# one process.
workers="${PYTEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
  python -m pytest -q tests "$@"
else
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" python -m pytest -q -n "$workers" tests "$@"
fi
