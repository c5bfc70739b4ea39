"""OpenAI-compatible routes of `serve-model`: `POST /v1/chat/completions` and `GET /v1/models`.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:5001/v1", api_key="unused")
    client.chat.completions.create(model="summary", messages=[{"role": "user", "content": "..."}],
                                   max_tokens=64, temperature=0.7, top_p=0.9, stop=["\\n"], seed=1)

`model` names a task the server serves: `summary` or `summary@champion` (the alias it serves; a
multi-task model serves each of its tasks at the alias it was registered with). Messages are rendered
with the task's prompt format (`PromptSettings.render_conversations`: the chat template for chat
tasks, one user message for template tasks). Parameters: `max_tokens` (or `max_completion_tokens`),
`temperature` (0, the default: greedy), `top_p`, `stop`, `seed`; `n` must be 1 and `stream` false;
anything else is a 400 naming it. Requests that arrive together are generated as one batch (for a
multi-task model, rows of several tasks with their own adapters: `Batcher`), within the server's
`ServingLimits`; the deadline ends a completion with finish_reason "length".
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from lora_module.prompt import PromptError
from lora_module.serving.predictor import Output, PredictInputError, Row

# OpenAI request fields -> predict params; the others a client may send and that change nothing here.
PARAM_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed"}
NEUTRAL_FIELDS = {"model", "messages", "n", "stream", "user"}
BATCH_WINDOW_SECONDS = 0.005  # how long the batcher waits for more requests after the first
BAD_INPUT = (PredictInputError, PromptError)  # the caller's errors: HTTP 400


class ModelNotServedError(PredictInputError):
    """A `model` this server does not serve (names the ones it does)."""


@dataclass
class Pending:
    """A chat request waiting for its batch."""

    task: str
    row: Row
    params: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Runs the chat requests that arrive together as one `run(tasks, rows, params)` call; requests
    with other params wait for the next batch. A batch that fails on bad input is re-run request by
    request, so each request gets its own answer or error."""

    def __init__(self, run: Callable[[list[str], list[Row], dict[str, Any]], list[Output]],
                 max_rows: int) -> None:
        self.run, self.max_rows = run, max_rows
        self.pending: list[Pending] = []
        self.wakeup = threading.Condition()
        threading.Thread(target=self._loop, name="chat-batcher", daemon=True).start()

    async def submit(self, task: str, row: Row, params: dict[str, Any]) -> Output:
        loop = asyncio.get_running_loop()
        request = Pending(task, row, params, loop, loop.create_future())
        with self.wakeup:
            self.pending.append(request)
            self.wakeup.notify()
        return await request.future

    def _take(self) -> list[Pending]:
        with self.wakeup:
            while not self.pending:
                self.wakeup.wait()
        time.sleep(BATCH_WINDOW_SECONDS)
        with self.wakeup:
            key = json.dumps(self.pending[0].params, sort_keys=True)
            batch = [p for p in self.pending if json.dumps(p.params, sort_keys=True) == key][: self.max_rows]
            self.pending = [p for p in self.pending if p not in batch]
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            try:
                tasks, rows = [p.task for p in batch], [p.row for p in batch]
                results: list[Any] = self.run(tasks, rows, batch[0].params)
            except BAD_INPUT:
                results = [self._alone(p) for p in batch]
            except Exception as e:  # noqa: BLE001 - the requests get the error, the batcher keeps serving
                results = [e] * len(batch)
            for request, result in zip(batch, results, strict=True):
                request.loop.call_soon_threadsafe(_settle, request.future, result)

    def _alone(self, request: Pending) -> Any:
        try:
            return self.run([request.task], [request.row], request.params)[0]
        except Exception as e:  # noqa: BLE001 - handed to the waiting request
            return e


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def chat_params(body: dict[str, Any]) -> dict[str, Any]:
    """Predict params from a chat completion request; PredictInputError naming an unsupported field."""
    unknown = sorted(set(body) - set(PARAM_FIELDS) - NEUTRAL_FIELDS)
    if unknown:
        raise PredictInputError(f"unsupported fields {unknown}; supported: "
                                f"{sorted(set(PARAM_FIELDS) | NEUTRAL_FIELDS)}")
    if body.get("n", 1) != 1:
        raise PredictInputError(f"n must be 1 (one choice per request), got {body['n']!r}")
    if body.get("stream", False) is not False:
        raise PredictInputError("stream must be false: this server answers whole completions")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise PredictInputError("give max_tokens or max_completion_tokens, not both")
    return {PARAM_FIELDS[k]: v for k, v in body.items() if k in PARAM_FIELDS and v is not None}


def served_models(python_model: Any, model_uri: str) -> dict[str, str]:
    """Model id -> task, for every id a request may name: each task, and `task@alias` for a task
    served at an alias (a pinned version is named by its task only)."""
    refs = getattr(python_model.predictor, "refs", None)
    if refs is not None:  # a multi-task model
        pairs = [(ref.task, ref.alias) for ref in refs.values()]
    elif model_uri.startswith("models:/"):
        name, _, alias = model_uri.removeprefix("models:/").partition("@")
        pairs = [(name.split("/")[0].removesuffix("-lora"), alias or None)]
    else:  # a model folder: named by its folder
        pairs = [(Path(model_uri).name, None)]
    return {key: task for task, alias in pairs for key in (task, *([f"{task}@{alias}"] if alias else []))}


def _runner(python_model: Any) -> tuple[Callable[[list[str], list[Row], dict[str, Any]], list[Output]], int]:
    """The batch function of a pyfunc model (single or multi-task) and its rows per request."""
    predictor = python_model.predictor
    if hasattr(predictor, "refs"):
        return predictor.generate, predictor.limits.max_rows
    limits = python_model.limits
    return (lambda tasks, rows, params: predictor.generate(rows, params, limits)), limits.max_rows


def completion(model: str, output: Output) -> dict[str, Any]:
    """The chat.completion object of one generated row."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": output.text},
                     "finish_reason": output.finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens,
                  "total_tokens": output.prompt_tokens + output.completion_tokens},
    }


def openai_error(message: str, status: int, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status)


def add_openai_routes(app: Any, pyfunc_model: Any, model_uri: str) -> None:
    """`GET /v1/models` and `POST /v1/chat/completions` for the pyfunc model loaded from `model_uri`."""
    python_model = pyfunc_model.unwrap_python_model()
    models = served_models(python_model, model_uri)
    batcher = Batcher(*_runner(python_model))

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        entries = [{"id": m, "object": "model", "created": 0, "owned_by": "lora-pipeline"} for m in models]
        return {"object": "list", "data": entries}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return openai_error(f"the request body is not JSON: {e}", 400)
        if not isinstance(body, dict):
            return openai_error("the request body must be a JSON object", 400)
        if body.get("model") not in models:
            return openai_error(f"model {body.get('model')!r} is not served here; served: {sorted(models)}",
                                404, "model_not_found")
        if not isinstance(body.get("messages"), list):
            return openai_error(f"messages must be a list of {{role, content}} turns, got "
                                f"{body.get('messages')!r:.80}", 400)
        try:
            output = await batcher.submit(models[body["model"]], body["messages"], chat_params(body))
        except BAD_INPUT as e:
            return openai_error(str(e), 400)
        return completion(body["model"], output)
