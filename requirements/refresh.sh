#!/usr/bin/env bash
# Re-resolve the lock files from pyproject.toml (its dependencies and the dev extra):
#   pip install uv && requirements/refresh.sh
# cuda.lock: Linux x86_64 with PyPI's CUDA build of torch and its nvidia/triton packages.
# cpu.lock: the same versions without the CUDA-only packages (the CPU build of torch is installed
# first by ./run.sh, and its metadata needs none of them). TORCH_VERSION picks torch (the version
# whose CPU build ./run.sh installs); everything else takes the newest release pyproject.toml admits.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
opts=(--extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet
      --custom-compile-command requirements/refresh.sh --annotation-style line)

echo "torch==$TORCH_VERSION" | uv pip compile pyproject.toml "${opts[@]}" --upgrade -c - -o requirements/cuda.lock
no_emit=()
for name in $(grep -oE '^(nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+|triton)==' requirements/cuda.lock | tr -d '='); do
  no_emit+=(--no-emit-package "$name")
done
# Constrained by cuda.lock, so both files hold the same version of every package they share.
uv pip compile pyproject.toml "${opts[@]}" --no-annotate -c requirements/cuda.lock "${no_emit[@]}" \
  -o requirements/cpu.lock
echo "requirements/cuda.lock: $(grep -c '==' requirements/cuda.lock) packages;" \
     "requirements/cpu.lock: $(grep -c '==' requirements/cpu.lock)"
