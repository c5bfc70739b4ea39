#!/usr/bin/env bash
# The prepared GPU check (issue 26): the `gpu` tests, then bench_gpu, then one report. <= 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh                      # on a CUDA machine; writes benchmarks/out/gpu_check/
#   bash benchmarks/gpu_check.sh --dry-run --out DIR  # on the CPU: the same code on tiny shapes, in seconds
#
# Writes OUT/gpu_check.{json,md} (the summary: test counts and every figure with its goal), OUT/gpu_tests.xml,
# OUT/bench_gpu.{json,md} and OUT/*.log. Each stage has its own time limit, so a hung stage still leaves a
# report that says what is missing. Exit status: 0 when both stages succeeded, 1 otherwise.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/benchmarks/out/gpu_check"
DRY=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=(--dry-run); shift ;;
        --out) [ $# -ge 2 ] || { echo "error: gpu_check.sh: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift 2 ;;
        *) echo "error: gpu_check.sh: unknown argument '$1' (valid: --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT" || { echo "error: gpu_check.sh: cannot create output folder '$OUT'" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python
cd "$ROOT" || exit 2
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Limits (seconds) that keep the whole check within 9 minutes: tests 240, benchmark 280, report seconds.
t0=$SECONDS
timeout 240 "$PY" -m pytest -m gpu tests/test_gpu.py tests/test_fsdp.py -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
    >"$OUT/gpu_tests.log" 2>&1
tests_rc=$?
t1=$SECONDS
timeout 280 "$PY" -m lora_pipeline.benchmarks.bench_gpu "${DRY[@]}" --out-dir "$OUT" >"$OUT/bench_gpu.log" 2>&1
bench_rc=$?
t2=$SECONDS
tail -n 3 "$OUT/gpu_tests.log"
"$PY" -m lora_pipeline.benchmarks.gpu_report --out "$OUT" --tests-rc "$tests_rc" \
    --seconds-tests $((t1 - t0)) --seconds-bench $((t2 - t1)) || exit 1
[ "$bench_rc" -eq 0 ] || echo "bench_gpu failed (exit $bench_rc): see $OUT/bench_gpu.log" >&2
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
