#!/usr/bin/env bash
# Entry point for a fresh machine:  ./run.sh setup | test | demo [args...]
#   setup  create .venv and install the project (CPU build of torch unless a GPU is present)
#   test   setup, then run the whole test suite on every core (what CI runs; -n 0 for one process)
#   demo   setup, then run the offline demo pipeline on the embedded Prefect + MLflow defaults
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --upgrade pip
  local gpu=""
  if command -v nvidia-smi >/dev/null 2>&1; then gpu=1; fi
  if [ -z "$gpu" ] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # The CPU build of torch first (TORCH_SPEC overrides it): the lock's torch line is then already met
    # and none of the CUDA build's nvidia packages come in. On a GPU machine cuda.lock brings torch.
    "$VENV/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
  # LOCK: the pinned set every machine gets (requirements/refresh.sh re-resolves it); LOCK=none takes
  # the newest releases pyproject.toml admits instead.
  local lock=${LOCK:-requirements/$([ -n "$gpu" ] && echo cuda || echo cpu).lock}
  if [ "$lock" = none ]; then
    "$VENV/bin/pip" install -q -e '.[dev]'
  else
    "$VENV/bin/pip" install -q -r "$lock"
    "$VENV/bin/pip" install -q --no-deps -e '.[dev]'
  fi
}

export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  # One pytest-xdist worker per core, a test file per worker (its module fixtures stay together).
  test) setup; HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 exec "$VENV/bin/python" -m pytest -n auto --dist loadfile "$@" ;;
  demo) setup; exec "$VENV/bin/lora-pipeline" demo "$@" ;;
  *) echo "usage: ./run.sh setup | test [pytest args] | demo [demo args]" >&2; exit 2 ;;
esac
