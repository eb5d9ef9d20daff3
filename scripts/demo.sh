#!/usr/bin/env bash
# The main job on a fresh machine: set up, make the tiny fixtures, run the whole pipeline locally
# on CPU (kfp.local), print the loss per step and where the fine-tuned model is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kfp-finetune demo "$@"
