#!/usr/bin/env bash
# The one-GPU device check (under 8 minutes): install the carried wheels, then run
# bench/gpu_check.py (phases and budgets: its docstring; how to run it: bench/README.md).
#
#   bash bench/gpu_check.sh              # GPU machine: wheels from .whl/ (bench/prepare_wheels.sh)
#   bash bench/gpu_check.sh --dry-run    # any machine: same phases, tiny models, CPU
#
# Environment: PYTHON (default: python3, the machine's own torch), WHEELS (default: .whl),
# SITE (install target, default /tmp/kfp-finetune-site), OUT (where the table and JSON lines go),
# INSTALL_WHEELS=1 (install the wheels in a dry run too).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/kfp-finetune-site}"
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done

start=$(date +%s)
# The dry run uses the environment it is started in (INSTALL_WHEELS=1 to install anyway).
if [ "$DRY" = 0 ] || [ "${INSTALL_WHEELS:-0}" = 1 ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheels in $WHEELS/; prepare them with bash bench/prepare_wheels.sh" >&2
    exit 2
  fi
  # No network on the device machine: only the carried wheels, no dependency resolution
  # (prepare_wheels.sh lists exactly the packages the machine lacks), torch left as it is.
  timeout 25 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # The machine's own packages the carried ones rely on (versions, for a failure's diagnosis).
  "$PYTHON" -m pip list 2>/dev/null | grep -iE '^(torch|triton|pyarrow|pandas|fsspec|huggingface.hub|tokenizers|tiktoken|safetensors) ' || true
fi
# The project itself from the checkout (no install needed).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${KFP_FINETUNE_COMMIT:-}" ] && [ -f "$WHEELS/COMMIT" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  KFP_FINETUNE_COMMIT="$(cat "$WHEELS/COMMIT")"
  export KFP_FINETUNE_COMMIT
fi
installed=$(( $(date +%s) - start ))
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" bench/gpu_check.py --install-seconds "$installed" "$@"
