"""Data preparation throughput: rows per second cold (nothing cached) vs cached (folder reused).

    lora-pipeline bench --only data       # 20,000 demo rows, writes benchmarks/out/bench_data.*
    from lora_pipeline.benchmarks.bench_data import run; run(quick=True, out_dir=tmp)

Cold = a fresh output root: generate the demo corpus, load it with `datasets`, validate, train the
demo tokenizer, tokenize and save. Cached = the same config again: the fingerprint matches and the
folder is reused without loading or tokenizing anything. Goal: cached >= 20x faster than cold.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import datasets

from lora_pipeline.benchmarks.common import OUT_DIR, Figure, time_interleaved, write_results
from lora_pipeline.data import DataConfig, prepare

NAME = "bench_data"


def _config(root: Path, rows: int) -> DataConfig:
    test = max(rows // 20, 1)
    return DataConfig(
        name="bench_demo",
        demo_train_size=rows - 2 * test,
        demo_validation_size=test,
        demo_test_size=test,
        max_source_length=256,
        max_target_length=64,
        output_root=str(root),
    )


def run(quick: bool = False, out_dir: Path | None = None) -> Path:
    """Time cold vs cached preparation of 20,000 demo rows (300 when quick); returns the JSON path."""
    datasets.disable_progress_bars()
    rows = 300 if quick else 20_000
    repeats = 1 if quick else 3
    scratch = Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        cached_root = scratch / "cached"
        first = prepare(_config(cached_root, rows))  # builds the folder the "cached" contender reuses
        cold_roots: list[Path] = []

        def cold() -> None:
            root = scratch / f"cold{len(cold_roots)}"
            cold_roots.append(root)
            assert not prepare(_config(root, rows)).reused

        def cached() -> None:
            assert prepare(_config(cached_root, rows)).reused

        seconds = time_interleaved({"cold": cold, "cached": cached}, repeats=repeats, warmup=0)
        manifest = first.manifest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    speedup = seconds["cold"] / seconds["cached"]
    figures = [
        Figure("cached_vs_cold_speedup", speedup, goal=20.0, direction=">=", unit="x"),
        Figure("cold_rows_per_s", rows / seconds["cold"], unit="rows/s"),
        Figure("cached_rows_per_s", rows / seconds["cached"], unit="rows/s"),
    ]
    raw = {
        "rows": rows,
        "repeats": repeats,
        "median_seconds": seconds,
        "split_rows": manifest["rows"],
        "first_build_seconds": manifest["seconds"],
        "first_build_stages": manifest["timings"],
        "token_lengths_train": manifest["lengths"]["train"],
    }
    return write_results(NAME, figures, raw, Path(out_dir or OUT_DIR))


if __name__ == "__main__":
    path = run()
    print(path.with_suffix(".md").read_text())
