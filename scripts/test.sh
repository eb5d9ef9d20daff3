#!/usr/bin/env bash
# The test suite on a fresh machine: set up, lint, the fast unit layer first (fail fast), check
# compiled/ is fresh, then the integration and reliability layers.
# tests/unit runs in this process: each xdist worker would re-import torch, kfp and torchtune,
# which costs more than the tests (2 cores: 15 s of CPU in one process, 34 s with -n 2).
# The other layers run in PYTEST_WORKERS processes (default 2, one per core here), a test file
# per worker (--dist loadfile keeps each file's module fixtures in one process);
# PYTEST_WORKERS=0 runs them in this process.
# Extra arguments go to both pytest runs (e.g. -x, -k NAME, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# exit status 5: -k/-m selected no unit test, which is no failure
.venv/bin/python -m pytest -q tests/unit "$@" || [ $? -eq 5 ]
.venv/bin/kfp-finetune compile --check
workers=${PYTEST_WORKERS:-2}
if [ "$workers" = "0" ]; then
  exec .venv/bin/python -m pytest -q --durations=15 tests/integration tests/reliability "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile --durations=15 \
  tests/integration tests/reliability "$@"
