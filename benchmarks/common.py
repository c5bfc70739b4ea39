"""Shared plumbing for benchmarks: machine description, timing, and writing JSON + Markdown.

Every benchmark measures its contenders side by side in one process and reports ratios;
absolute timings on shared machines are noisy, ratios are what we compare.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"
LIBRARIES = ("torch", "transformers", "peft", "lightning", "bitsandbytes", "datasets", "mlflow", "prefect")


def machine_info() -> dict:
    """CPU model, cores, GPU if any, and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call for each contender, alternating them so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


@dataclass
class Figure:
    """One compared figure: a ratio with its goal (`ratio <= goal` or `>=`)."""

    name: str
    value: float
    goal: float | None = None
    direction: str = "<="
    unit: str = "x"
    detail: dict = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        return self.value <= self.goal if self.direction == "<=" else self.value >= self.goal


def write_results(name: str, figures: list[Figure], raw: dict, out_dir: Path | None = None) -> Path:
    """Write `<name>.json` and `<name>.md` under `out_dir`; returns the JSON path."""
    out = Path(out_dir or OUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "machine": machine_info(),
        "figures": [asdict(f) | {"met": f.met} for f in figures],
        "raw": raw,
    }
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    lines = [f"## {name}", "", "| figure | value | goal | met |", "| --- | --- | --- | --- |"]
    for f in figures:
        goal = f"{f.direction} {f.goal:g}" if f.goal is not None else "-"
        met = {True: "yes", False: "no", None: "-"}[f.met]
        lines.append(f"| {f.name} | {f.value:.3f} {f.unit} | {goal} | {met} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return json_path


def main(run: Callable[..., Path], doc: str, quick_help: str) -> None:
    """`python -m lora_pipeline.benchmarks.bench_X [--quick]`: run one benchmark, then print its Markdown."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    path = run(quick=parser.parse_args().quick)
    print(path.with_suffix(".md").read_text())
