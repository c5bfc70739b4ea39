"""The serving commands: generate with a registered adapter, or serve a registered model over HTTP.

    lora-pipeline predict summary --text "#Person1#: ..." [--file inputs.jsonl] [--json]
    lora-pipeline serve-model models:/lora-tasks@champion --port 5001 [--workers 2 --threads 1]
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_records": [{"task": "summary", "text": "#Person1#: ..."}],
           "params": {"max_new_tokens": 32}}'

`predict` runs the same path as the served model (`serving.predictor.AdapterPredictor`: the task's
prompt template, prompts cut as in training, greedy by default). `serve-model` becomes (`os.execve`)
the server of `serving.server` (MLflow's scoring app plus OpenAI routes, uvicorn in-process, so
SIGTERM / SIGINT stop it and nothing is left holding the port), with the tracking URI and the
request limits (`--max-rows`, `--max-new-tokens`, ..., `--deadline-seconds`: `ServingLimits`) in
its environment, so it works from a fresh shell on any machine that reaches the tracking server.
Tracking URI: `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else the embedded SQLite store under
`$LORA_PIPELINE_HOME`.

Threads: each server worker runs torch with `--threads` intra-op threads (default: `$OMP_NUM_THREADS`
if set, else 1), set as OMP_NUM_THREADS / MKL_NUM_THREADS in the server's environment, which torch
reads when it starts. Why 1: a request is a few short sequences, too little work to share between
cores, and torch's default (one thread per core) made 6 mixed-task rows take 21 s instead of 0.25 s
on a busy 2-core machine, its threads spinning against other processes. Scale with `--workers`; give
more threads to a large base on an idle machine (`--threads 0`: torch's default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_module.contracts import CHAMPION
from lora_module.errors import ArgumentParser, InputNotFoundError, PipelineError, port_number, whole_number
from lora_module.redact import redact_uri
from lora_module.registry.bases import BASE_ENV
from lora_module.registry.retry import RetryPolicy
from lora_module.serving.multitask import DEFAULT_REFRESH_SECONDS, REFRESH_ENV
from lora_module.serving.predictor import LIMIT_ENV, PredictInputError, ServingLimits

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by torch (and its BLAS) at start-up
DEFAULT_SERVE_THREADS = 1


class ServeSettingsError(PipelineError, ValueError):
    """A `serve-model` setting out of range (names the option and what is valid)."""


TRACKING_HELP = ("MLflow tracking/registry URI (if not given: $MLFLOW_TRACKING_URI, else the SQLite store "
                 "under the pipeline home)")


def read_texts(texts: list[str] | None, file: str | None) -> list[str | list[dict[str, Any]]]:
    """`--text` values plus `--file` lines (or .jsonl rows' `text` / `prompt` field, or `messages`: a
    conversation, rendered with the task's chat template), in order."""
    out = list(texts or [])
    if file:
        path = Path(file)
        if not path.is_file():
            raise InputNotFoundError(f"--file {path} does not exist")
        if path.suffix == ".jsonl":  # rows with a "text" (or the prepared data's "prompt") field
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PredictInputError(f"{path} line {i + 1} is not JSON: {e.msg}") from e
                    if not isinstance(row, dict) or not {"text", "prompt", "messages"} & set(row):
                        raise PredictInputError(
                            f"{path} line {i + 1} has none of the fields 'text', 'prompt', 'messages'")
                    out.append(row.get("text", row.get("prompt", row.get("messages"))))
        else:
            out += [line for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise PredictInputError("nothing to predict: give --text (repeatable) or --file")
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from lora_module.serving.loading import load_predictor

    texts = read_texts(args.text, args.file)
    ref = f"models:/{args.model_name}" if args.model_name else args.task
    predictor = load_predictor(
        ref, version=args.version, alias=args.alias, base=args.base, force=args.force,
        tracking_uri=args.tracking_uri, retries=args.retries, backoff=args.backoff,
    )
    outputs = predictor.predict(texts, {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams,
                                        "batch_size": args.batch_size})
    if args.json:
        print(json.dumps([{"input": t, "output": o} for t, o in zip(texts, outputs, strict=True)], indent=2))
    else:
        print("\n".join(o.replace("\n", " ") for o in outputs))
    return 0


def serve_command(model_uri: str, host: str, port: int, workers: int) -> list[str]:
    """The server's command line (`serving.server`), run by this interpreter."""
    return [sys.executable, "-m", "lora_module.serving.server", "-m", model_uri, "-h", host, "-p", str(port),
            "-w", str(workers)]


def serve_limits(args: argparse.Namespace) -> dict[str, str]:
    """The request limits given on the command line, as `LIMIT_ENV` variables."""
    if args.deadline_seconds is not None and not 0 <= args.deadline_seconds < float("inf"):  # NaN too
        raise ServeSettingsError(f"--deadline-seconds must be a number of seconds >= 0 (0: no deadline), "
                                 f"got {args.deadline_seconds}")
    return {variable: str(getattr(args, name)) for name, variable in LIMIT_ENV.items()
            if getattr(args, name) is not None}


def serve_threads(threads: int | None) -> int | None:
    """Intra-op threads of each server worker: `threads`, else `$OMP_NUM_THREADS`, else 1; None (from
    0): leave torch's default."""
    if threads is None:
        given = os.environ.get(THREAD_ENV[0], "").strip()
        if given and not given.isdigit():
            raise ServeSettingsError(f"$OMP_NUM_THREADS is {given!r}, not a whole number; unset it or "
                                     "give --threads N")
        threads = int(given) if given else DEFAULT_SERVE_THREADS
    if threads < 0:
        raise ServeSettingsError(f"--threads must be >= 0 (0: torch's default), got {threads}")
    return threads or None


def serve_env(tracking_uri: str, base: str | None, refresh_seconds: float | None,
              threads: int | None = None, limits: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the server: this interpreter's bin first on PATH, the tracking URI, settings,
    the request limits (`serve_limits`), and `serve_threads(threads)` as OMP_NUM_THREADS /
    MKL_NUM_THREADS."""
    env = {**os.environ, **(limits or {})}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = tracking_uri
    if base:
        env[BASE_ENV] = base
    if refresh_seconds is not None:
        env[REFRESH_ENV] = str(refresh_seconds)
    count = serve_threads(threads)
    for key in THREAD_ENV:
        if count is None:
            env.pop(key, None)
        else:
            env[key] = str(count)
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    from lora_module.registry.store import check_registered
    from lora_module.registry.tracking import configure_tracking

    env_threads = serve_threads(args.threads)  # a bad value fails before the registry is asked
    limits = serve_limits(args)
    uri = configure_tracking(args.tracking_uri)
    if args.model_uri.startswith("models:/"):  # fail in one line before starting a server for nothing
        check_registered(args.model_uri, uri)
    cmd = serve_command(args.model_uri, args.host, args.port, args.workers)
    threads = f"{env_threads} thread(s)" if env_threads else "torch's default threads"
    print(f"serving {args.model_uri} (registry {redact_uri(uri)}) on http://{args.host}:{args.port}"
          f"/invocations and /v1/chat/completions ({args.workers} worker(s), {threads} each)", flush=True)
    os.execve(cmd[0], cmd, serve_env(uri, args.base, args.refresh_seconds, args.threads, limits))
    return 0  # not reached: execve replaces this process


def _add_predict(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("predict", help="generate with a registered adapter (default @champion)",
                       description="Generate with a task's registered adapter: the task's prompt template "
                       "is applied to each input, prompts are cut as in training.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("task", help="task name (registered model <task>-lora)")
    s.add_argument("--model-name", help="registered model name, instead of <task>-lora")
    s.add_argument("--version", help="version number (if not given: the alias's version)")
    s.add_argument("--alias", default=CHAMPION, help="alias to load when no --version is given")
    s.add_argument("--text", action="append", help="input text (repeatable), e.g. a dialogue")
    s.add_argument("--file", help="inputs: one per line, or .jsonl rows with 'text' / 'prompt'")
    s.add_argument("--base", help="base model folder / Hub id instead of the adapter's recorded base")
    s.add_argument("--force", action="store_true", help="load even if the base fingerprint differs")
    s.add_argument("--max-new-tokens", type=int,
                   help="generated tokens per input at most (if not given: the trained target length)")
    s.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    s.add_argument("--batch-size", type=int, help="inputs per generation batch (if not given: 16)")
    s.add_argument("--json", action="store_true", help="print [{input, output}] as JSON")
    s.add_argument("--tracking-uri", help=TRACKING_HELP)
    s.add_argument("--retries", type=int, default=RetryPolicy.retries, help="retries of each registry call")
    s.add_argument("--backoff", type=float, default=RetryPolicy.backoff, help="first retry wait in seconds")
    s.set_defaults(func=cmd_predict)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve-model", help="serve a registered model over HTTP (/invocations, /v1)",
                       description="Serve a registered model (one task's adapter, or a multi-task model "
                       "from register-multitask) over HTTP: POST /invocations (MLflow), POST "
                       "/v1/chat/completions and GET /v1/models (OpenAI).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION (one task or lora-tasks)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=port_number, default=5001, help="port (1-65535)")
    s.add_argument("--workers", type=whole_number(1), default=1,
                   help="server processes, each with its own model")
    s.add_argument("--threads", type=whole_number(0), help="torch threads per worker (sets "
                   "OMP_NUM_THREADS and MKL_NUM_THREADS; if not given: $OMP_NUM_THREADS, else 1: a request "
                   "is too small to share between cores, and more threads than idle cores slow it many "
                   "times; 0: torch's default, one per core)")
    s.add_argument("--base", help=f"base folder or Hub id instead of the recorded one (sets {BASE_ENV}; "
                   "if not given: the recorded folder, else its logged copy, else the Hub id)")
    s.add_argument("--refresh-seconds", type=float, help=f"alias re-resolution period of a multi-task "
                   f"model (sets {REFRESH_ENV}; if not given: {DEFAULT_REFRESH_SECONDS:g}; negative: never)")
    s.add_argument("--tracking-uri", help=TRACKING_HELP)
    _add_limits(s)
    s.set_defaults(func=cmd_serve)


def _add_limits(s: argparse.ArgumentParser) -> None:
    """The request limits (`ServingLimits`; a request above one gets HTTP 400 naming it)."""
    helps = {"max_rows": "rows per request", "max_input_chars": "characters of one row's input",
             "max_new_tokens": "generated tokens per row", "max_num_beams": "beam width",
             "max_total_tokens": "generated tokens per request (rows x max_new_tokens)",
             "deadline_seconds": "wall time a request may generate; then every row stops where it is "
                                 "(0: no deadline)"}
    defaults = ServingLimits()
    for name, variable in LIMIT_ENV.items():
        kind = float if name == "deadline_seconds" else whole_number(1)
        s.add_argument(f"--{name.replace('_', '-')}", type=kind,
                       help=f"{helps[name]} at most (sets {variable}; if not given: ${variable}, else "
                       f"{getattr(defaults, name):g})")


def build_parser() -> ArgumentParser:
    """The `predict` and `serve-model` commands."""
    p = ArgumentParser(prog="lora-pipeline", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _add_predict(sub)
    _add_serve(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`lora-pipeline predict|serve-model ...` (argv starts with the command)."""
    args = build_parser().parse_args(argv)
    return args.func(args)
