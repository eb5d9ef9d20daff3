#!/usr/bin/env bash
# The test suite on a fresh machine: set up, lint, check compiled/ is fresh, run every test.
# Tests run in PYTEST_WORKERS processes (default 2, one per core here), a test file per worker
# (--dist loadfile keeps each file's module fixtures in one process); PYTEST_WORKERS=0 runs
# them in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/kfp-finetune compile --check
workers=${PYTEST_WORKERS:-2}
if [ "$workers" = "0" ]; then
  exec .venv/bin/python -m pytest -q --durations=15 "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile --durations=15 "$@"
