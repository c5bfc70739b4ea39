"""The HTTP server `lora-pipeline serve-model` runs: MLflow's scoring app under uvicorn, in this process.

    python -m lora_module.serving.server -m models:/lora-tasks@champion -h 127.0.0.1 -p 5001 -w 1

Routes: MLflow's own (`/ping`, `/health`, `/version`, `/invocations`, built by
`mlflow.pyfunc.scoring_server.init`), with `/invocations` refusing params the model does not take
(MLflow would drop them with a log line and answer 200) and accepting `stop` as one string; plus the
OpenAI-compatible `/v1/chat/completions` and `/v1/models` (`serving.openai_api`).

Why not `mlflow models serve`: it starts uvicorn as a child process, and a SIGTERM to it left that
child holding the port. Here uvicorn runs in the process `serve-model` became (`os.execve`), so
SIGTERM / SIGINT stop it (with `--workers N`, uvicorn's supervisor stops its workers): requests in
flight get `GRACE_SECONDS` to finish, then every generation stops at its next token
(`predictor.STOP_ALL`) and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from lora_module.errors import ArgumentParser, run_cli
from lora_module.serving.predictor import STOP_ALL, PredictInputError

MODEL_ENV = "LORA_SERVE_MODEL_URI"  # how the uvicorn workers learn which model to load
GRACE_SECONDS = 5
# uvicorn restarts a worker that does not answer its supervisor's ping in time (default 5 s): a
# worker importing torch and loading its model on a busy machine takes longer, and was restarted forever.
WORKER_HEALTHCHECK_SECONDS = 180
PREDICT_FAILED = "Failed to predict data"  # how MLflow's scoring server wraps a model's error


def check_params(body: bytes, allowed: set[str]) -> bytes:
    """A JSON request body with its `params` checked against `allowed` (PredictInputError naming the
    unknown ones) and a `stop` string made a one-string list (the signature's shape); other bodies
    are returned as they are, for MLflow to judge."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    params = payload.get("params") if isinstance(payload, dict) else None
    if not isinstance(params, dict):
        return body
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise PredictInputError(f"unknown params {unknown}; this model takes {sorted(allowed)}")
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    return json.dumps(payload).encode()


def error_response(error: Exception, status: int = 400) -> Response:
    """MLflow's error body (`{"error_code": ..., "message": ...}`) for `error`."""
    from mlflow.exceptions import MlflowException

    body = MlflowException.invalid_parameter_value(f"{type(error).__name__}: {error}").serialize_as_json()
    return Response(content=body, status_code=status, media_type="application/json")


def _replace_invocations(app: Any, model: Any) -> None:
    """MLflow's `/invocations`, with `check_params` before it."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    schema = model.metadata.get_params_schema()
    allowed = {p.name for p in schema.params} if schema is not None else set()
    input_schema = model.metadata.get_input_schema()
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/invocations"]

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        data, content_type = await request.body(), request.headers.get("content-type") or ""
        try:
            if content_type.split(";")[0].strip() == "application/json":
                data = check_params(data, allowed)
            result = await asyncio.to_thread(scoring_server.invocations, data, content_type, model,
                                             input_schema)
        except PredictInputError as e:
            return error_response(e)
        except MlflowException as e:
            # MLflow puts the whole input before the model's one-line message: keep the message.
            if e.message.startswith(PREDICT_FAILED):
                e.message = e.message.split("\nError: ", 1)[-1]
            return Response(content=e.serialize_as_json(), status_code=e.get_http_status_code(),
                            media_type="application/json")
        return Response(content=result.response, status_code=result.status, media_type=result.mimetype)


@contextlib.asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    STOP_ALL.clear()
    yield
    STOP_ALL.set()  # after the grace period: generations still running stop at their next token


def create_app(model_uri: str | None = None) -> Any:
    """The FastAPI app serving `model_uri` (default: `$LORA_SERVE_MODEL_URI`)."""
    from mlflow.pyfunc import scoring_server

    from lora_module.serving.openai_api import add_openai_routes

    model_uri = model_uri or os.environ[MODEL_ENV]
    model = scoring_server.load_model_with_mlflow_config(model_uri)
    app = scoring_server.init(model)
    app.router.lifespan_context = _lifespan
    _replace_invocations(app, model)
    add_openai_routes(app, model, model_uri)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a model until SIGTERM / SIGINT (the arguments `serving.cli.serve_command` gives)."""
    import uvicorn

    parser = ArgumentParser(prog="lora_module.serving.server", description=__doc__.split("\n\n")[0],
                            add_help=False)
    parser.add_argument("-m", "--model-uri", required=True, help="models:/NAME@ALIAS or a model folder")
    parser.add_argument("-h", "--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("-p", "--port", type=int, default=5001, help="port")
    parser.add_argument("-w", "--workers", type=int, default=1, help="server processes")
    parser.add_argument("--help", action="help", help="show this help and exit")
    args = parser.parse_args(argv)
    os.environ[MODEL_ENV] = args.model_uri
    uvicorn.run("lora_module.serving.server:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, timeout_graceful_shutdown=GRACE_SECONDS,
                timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS, log_level="info")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, sys.argv[1:]))
