"""Run training as its own process: how flows (and anything else) launch `fit`.

    from lora_module.train import run_fit
    out = run_fit("deploy/configs/demo_summary_lora.yaml",
                  ["--data.prepared_dir", prepared, "--model.output_dir", "runs/s1"])
    out / "adapter", out / "metrics.json"

Why a subprocess: multi-device DDP re-launches the entry script once per rank, so it must be an
entry point of its own (the Lightning CLI), never the Python process of a caller such as a Prefect
task. A crash, an out-of-memory kill or a non-finite loss therefore cannot take the caller down;
`run_fit` raises `TrainingError` with the end of the log instead. The full log of every run is
appended to `<output_dir>/logs/fit.log`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TAIL_LINES = 60


class TrainingError(RuntimeError):
    """The training subprocess failed; the message holds the command, exit code and the log's tail."""


def resolve_output_dir(config_path: str | Path, overrides: Sequence[str] = ()) -> Path:
    """The run's `model.output_dir` after applying `overrides`, by parsing (not running) the config."""
    from lora_module.cli import parse_config

    try:
        config = parse_config(["--config", str(config_path), *overrides])
    except SystemExit as e:
        raise TrainingError(
            f"invalid training configuration {config_path} (overrides {list(overrides)})"
        ) from e
    return Path(config.model.output_dir).resolve()


def run_fit(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> Path:
    """Train with `python -m lora_module fit --config config_path *overrides`; returns the output dir.

    Args:
        config_path: Training YAML (e.g. deploy/configs/demo_summary_lora.yaml).
        overrides: Extra CLI arguments, e.g. ["--data.prepared_dir", "p", "--trainer.max_steps", "100"].
        resume: Continue from `<output_dir>/checkpoints/last.ckpt` when it exists (same step count,
            schedule and optimizer state); ignored if the overrides already give `--ckpt_path`.
        env: Extra environment variables for the subprocess (e.g. MLFLOW_TRACKING_URI).
        timeout: Seconds before the run is killed (None: no limit).

    Raises:
        TrainingError: the config does not parse, the process fails, or the expected outputs are missing.
    """
    config_path = Path(config_path)
    if not config_path.is_file():
        raise TrainingError(f"training config {config_path} does not exist")
    overrides = [str(o) for o in overrides]
    out = resolve_output_dir(config_path, overrides)
    last = out / "checkpoints" / "last.ckpt"
    if resume and last.exists() and not any(o.startswith("--ckpt_path") for o in overrides):
        overrides += ["--ckpt_path", str(last)]
    cmd = [sys.executable, "-m", "lora_module", "fit", "--config", str(config_path), *overrides]

    child_env = {**os.environ, **(env or {})}
    # The child must import this project whatever its working directory.
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), child_env.get("PYTHONPATH")) if p
    )
    log_path = out / "logs" / "fit.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env, errors="replace"
        )

        def pump() -> None:
            # Read in a thread so `timeout` applies even while the child prints nothing.
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail.append(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.wait()
            raise TrainingError(f"training exceeded {timeout} s and was killed: {' '.join(cmd)}") from e
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            reader.join(timeout=10)
    if rc != 0:
        raise TrainingError(
            f"training failed with exit code {rc}: {' '.join(cmd)}\n"
            f"--- last {len(tail)} lines of {log_path} ---\n{''.join(tail)}"
        )
    missing = [p for p in ("metrics.json", "config.yaml") if not (out / p).exists()]
    if not ((out / "adapter").is_dir() or (out / "model").is_dir()):
        missing.append("adapter/ or model/")
    if missing:
        raise TrainingError(f"training exited 0 but {out} lacks {missing}; see {log_path}")
    return out
