#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (ignored by git; carried to the device
# machine with `carry: [".whl"]`), for its Python 3.12 on x86-64 manylinux, and note the commit.
#
#   bash bench/prepare_wheels.sh            # versions as installed in .venv (the project's pins)
#
# The GPU machine has its own torch (2.11+cu130), triton, a compiler, numpy, pandas, pyarrow,
# safetensors, tokenizers, tiktoken, sentencepiece, huggingface_hub, fsspec, xxhash, requests,
# lxml, pillow, psutil, pyyaml (see /work/.library/device/KINDS.md); what the benchmark's import
# closure needs beyond that is listed below, each with --no-deps so nothing else (torch above
# all) is pulled in. kfp and kfp-kubernetes are not carried: nothing the check runs imports
# them, and their protobuf/google-* pins would shadow the machine's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
DEST="${DEST:-.whl}"
PACKAGES=(torchtune torchao torchdata omegaconf antlr4-python3-runtime datasets dill
          multiprocess blobfile pycryptodomex)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
specs=()
for name in "${PACKAGES[@]}"; do
  version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  specs+=("$name==$version")
done
echo "prepare_wheels: ${specs[*]}"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"
commit=$(git rev-parse --short HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then commit="$commit+dirty"; fi
echo "$commit" > "$DEST/COMMIT"
ls -1 "$DEST"
du -sh "$DEST"
