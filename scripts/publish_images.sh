#!/usr/bin/env bash
# Builds both images, pushes them to REGISTRY and compiles the pipelines against them.
#
#   bash scripts/publish_images.sh REGISTRY OUTPUT_DIR [TAG]
#
#   REGISTRY    where to push, e.g. ghcr.io/my-org or registry.example.com:5000/ml
#               (log in first: docker login / podman login)
#   OUTPUT_DIR  folder for the compiled pipelines that name these images (not compiled/,
#               which keeps the default images)
#   TAG         image tag, default: the project version
#
# Uses docker, else podman (ENGINE=podman to choose). PLATFORM (default linux/amd64) is the
# platform built for, PYTHON (default .venv/bin/python) the project's Python. Each build runs
# images/smoke.py on CPU; a failed build or push stops the script before anything is compiled.
# Needs the project installed (bash scripts/setup.sh).
set -euo pipefail

die() { echo "publish_images: $*" >&2; exit 2; }

[ $# -ge 2 ] && [ $# -le 3 ] || die "usage: bash scripts/publish_images.sh REGISTRY OUTPUT_DIR [TAG]"
registry=$1 out=$2
case $out in /*) ;; *) out=$PWD/$out ;; esac  # relative to where the user stands
cd "$(dirname "$0")/.."

py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=$(command -v python3 || true); fi
fi
[ -n "$py" ] && "$py" -c "import kfp_finetune" 2>/dev/null \
  || die "the project is not installed: run bash scripts/setup.sh first"

# One line per image: its Dockerfile, its reference, the variable that names it at compile time.
# This also validates REGISTRY and TAG.
refs=$("$py" -m kfp_finetune.config.images "$registry" ${3:+"$3"}) || exit 2

out_abs=$("$py" -c 'import os, sys; print(os.path.realpath(sys.argv[1]))' "$out")
[ "$out_abs" != "$(pwd -P)/compiled" ] \
  || die "OUTPUT_DIR is the repository's compiled/, which keeps the default images: name another"

engine=${ENGINE:-}
if [ -z "$engine" ]; then
  for candidate in docker podman; do
    if command -v "$candidate" >/dev/null; then engine=$candidate; break; fi
  done
fi
[ -n "$engine" ] || die "neither docker nor podman is installed: install one (or set ENGINE)"
command -v "$engine" >/dev/null || die "ENGINE=$engine is not installed"

while read -r dockerfile ref _; do
  echo "publish_images: $engine build -f $dockerfile -t $ref"
  "$engine" build --platform "${PLATFORM:-linux/amd64}" -f "$dockerfile" -t "$ref" . \
    || die "building $ref failed (its smoke test is part of the build; see the log above)"
done <<< "$refs"

images=()
while read -r _ ref var; do
  "$engine" push "$ref" || die "pushing $ref failed: is $engine logged in to that registry ($engine login)?"
  images+=("$var=$ref")
done <<< "$refs"

env "${images[@]}" "$py" -m kfp_finetune.drivers.cli compile --output-dir "$out"
echo "publish_images: pushed ${images[*]}; pipelines compiled against them in $out/"
