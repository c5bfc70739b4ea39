"""Run training as its own process: how flows (and anything else) launch `fit`.

    from lora_module.training.launcher import run_fit
    out = run_fit("deploy/configs/demo_summary_lora.yaml",
                  ["--data.prepared_dir", prepared, "--model.output_dir", "runs/s1"])
    out / "adapter", out / "metrics.json"
    run_fit(config, overrides, output_dir="runs/s1", tracking_uri=home.tracking_uri,
            experiment=home.experiment("summary"))     # how the flows call it: the config is checked

Why a subprocess: multi-device DDP re-launches the entry script once per rank, so it must be an
entry point of its own (the Lightning CLI), never the Python process of a caller such as a Prefect
task. A crash, an out-of-memory kill or a non-finite loss therefore cannot take the caller down;
`run_fit` raises `TrainingError` with the end of the log instead. The full log of every run is
appended to `<output_dir>/logs/fit.log`. Credentials in the tracking URI reach the subprocess through
its environment only; the command line, the log and errors show them masked (lora_module.redact).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from lora_module.errors import PipelineError
from lora_module.home import TRACKING_ENV
from lora_module.redact import redact_text, redact_uri
from lora_module.training.outputs import current_outputs
from lora_module.training.resume import check_ckpt_overrides

TAIL_LINES = 60


class TrainingError(PipelineError, RuntimeError):
    """The training subprocess failed; the message holds the command, exit code and the log's tail."""


def resolve_output_dir(config_path: str | Path, overrides: Sequence[str] = ()) -> Path:
    """The run's `model.output_dir` after applying `overrides`, by parsing (not running) the config."""
    from lora_module.training.cli import parse_config

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
    output_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> Path:
    """Train in a subprocess, `python -m lora_module.training fit --config config_path *overrides`.

    Args:
        config_path: Training YAML (e.g. deploy/configs/demo_summary_lora.yaml).
        overrides: Extra CLI arguments, e.g. ["--data.prepared_dir", "p", "--trainer.max_steps", "100"].
        resume: Continue from `<output_dir>/checkpoints/last.ckpt` when it exists (same step count,
            schedule and optimizer state); ignored if the overrides already give `--ckpt_path`.
        env: Extra environment variables for the subprocess (e.g. OMP_NUM_THREADS).
        timeout: Seconds before the run is killed (None: no limit).
        output_dir: The run's `model.output_dir`, passed to the CLI; when given, the config is not
            parsed here (the caller checked it already; a bad one fails in the subprocess). None:
            parse the config for its output_dir, failing here on a bad one.
        tracking_uri, experiment: MLflow store and experiment (e.g. `lora-<task>`) of the training
            run, set on the config's MLflow logger (so that logger must not be `false`); None: the
            config's, else the logger's defaults.

    Raises:
        TrainingError: the config does not parse, the process fails, or the expected outputs are missing.
        RemoteCheckpointError: the overrides pass a `--ckpt_path` that is not a local file.
    """
    config_path = Path(config_path)
    if not config_path.is_file():
        raise TrainingError(f"training config {config_path} does not exist")
    overrides = [str(o) for o in overrides]
    check_ckpt_overrides(overrides)
    overrides += _logger_overrides(tracking_uri, experiment, env := dict(env or {}))
    if output_dir is not None:
        out = Path(output_dir).resolve()
        overrides += ["--model.output_dir", str(out)]
    else:
        out = resolve_output_dir(config_path, overrides)
    last = out / "checkpoints" / "last.ckpt"
    if resume and last.exists() and not any(o.startswith("--ckpt_path") for o in overrides):
        overrides += ["--ckpt_path", str(last)]
    cmd = [sys.executable, "-m", "lora_module.training", "fit", "--config", str(config_path), *overrides]
    log_path = out / "logs" / "fit.log"
    rc, tail = _run_logged(cmd, {**os.environ, **env}, log_path, timeout)
    if rc != 0:
        raise TrainingError(
            f"training failed with exit code {rc}: {redact_text(' '.join(cmd))}\n"
            f"--- last {len(tail)} lines of {log_path} ---\n{''.join(tail)}"
        )
    done = current_outputs(out)  # one export, read as a whole (training.outputs)
    missing = [p for p in ("metrics.json", "config.yaml") if not (done / p).exists()]
    if not ((done / "adapter").is_dir() or (done / "model").is_dir()):
        missing.append("adapter/ or model/")
    if missing:
        raise TrainingError(f"training exited 0 but {out} lacks {missing}; see {log_path}")
    return out


def _logger_overrides(tracking_uri: str | None, experiment: str | None, env: dict[str, str]) -> list[str]:
    """CLI arguments for the MLflow store and experiment. Credentials in the URI go into `env` (the
    subprocess's environment) instead: the argument, and so config.yaml, fit.log and `ps`, has them
    masked, and the CLI's logger takes them back from there (cli.with_credentials)."""
    if tracking_uri is not None and redact_uri(tracking_uri) != tracking_uri:
        env[TRACKING_ENV] = tracking_uri
    args = []
    for key, value in (("tracking_uri", redact_uri(tracking_uri)), ("experiment_name", experiment)):
        if value is not None:
            args += [f"--trainer.logger.init_args.{key}", value]
    return args


def _run_logged(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float | None
                ) -> tuple[int, deque[str]]:
    """Run `cmd`, appending its output to `log_path`; (exit code, the output's last lines)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with open(log_path, "a") as log:
        log.write(f"$ {redact_text(' '.join(cmd))}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace"
        )

        def pump() -> None:
            # Read in a thread so `timeout` applies even while the child prints nothing.
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = redact_text(raw)  # MLflow prints run links with the tracking URI's credentials
                log.write(line)
                tail.append(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.wait()
            raise TrainingError(f"training exceeded {timeout} s and was killed: {redact_text(' '.join(cmd))}"
                                ) from e
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            reader.join(timeout=10)
    return rc, tail
