#!/usr/bin/env bash
# The test suite on a fresh machine: set up, lint, check compiled/ is fresh, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/kfp-finetune compile --check
exec .venv/bin/python -m pytest -q "$@"
