"""OpenAI-compatible routes of `serve-model`: `POST /v1/chat/completions` and `GET /v1/models`.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:5001/v1", api_key="unused")
    client.chat.completions.create(model="summary", messages=[{"role": "user", "content": "..."}],
                                   max_tokens=64, temperature=0.7, top_p=0.9, stop=["\\n"], seed=1)
    for chunk in client.chat.completions.create(model="summary", messages=[...], stream=True):
        print(chunk.choices[0].delta.content or "", end="")

`model` names a task the server serves: `summary` or `summary@champion` (the alias it serves; a
multi-task model serves each of its tasks at the alias it was registered with). Messages are rendered
with the task's prompt format (`PromptSettings.render_conversations`: the chat template for chat
tasks, one user message for template tasks). Parameters: `max_tokens` (or `max_completion_tokens`),
`temperature` (0, the default: greedy), `top_p`, `stop`, `seed`, `stream`, `stream_options`
(`include_usage`); `n` must be 1; anything else is a 400 naming it. Requests that arrive together are
generated as one batch (for a multi-task model, rows of several tasks with their own adapters; streamed
and whole completions alike: `Batcher`), within the server's `ServingLimits`; the deadline ends a
completion with finish_reason "length".

`stream: true` answers as OpenAI does, while the row generates: Server-Sent Events of
`chat.completion.chunk`s (the role first, then content deltas, then an empty delta with the
finish_reason, with `include_usage` a last chunk with `usage` and no choices), then `data: [DONE]`.
The deltas never hold text the answer later drops (`streaming.TextDeltas`), so they join to exactly
the text `stream: false` gives. Errors found before generation (params, limits, the model) are the
same JSON 400 / 404 responses; a client that goes away mid-stream leaves the batch generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lora_module.prompt import PromptError
from lora_module.serving.predictor import Output, PredictInputError, Row, parse_params
from lora_module.serving.streaming import TextDeltas

# OpenAI request fields -> predict params; the others a client may send and that change nothing here.
PARAM_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed"}
NEUTRAL_FIELDS = {"model", "messages", "n", "stream", "stream_options", "user"}
BATCH_WINDOW_SECONDS = 0.005  # how long the batcher waits for more requests after the first
BAD_INPUT = (PredictInputError, PromptError)  # the caller's errors: HTTP 400
OnTokens = Callable[[list[int]], None]
logger = logging.getLogger(__name__)


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
    on_tokens: OnTokens | None = field(default=None, repr=False)
    """A streamed request's: called each step with its row's generated ids (`RowJob.on_tokens`)."""


class Batcher:
    """Runs the chat requests that arrive together as one `run(tasks, rows, params)` call (plus
    `on_tokens=[...]`, one per row, when any of them streams); requests with other params wait for the
    next batch. A batch that fails on bad input is re-run request by request, so each request gets its
    own answer or error."""

    def __init__(self, run: Callable[..., list[Output]], max_rows: int) -> None:
        self.run, self.max_rows = run, max_rows
        self.pending: list[Pending] = []
        self.wakeup = threading.Condition()
        threading.Thread(target=self._loop, name="chat-batcher", daemon=True).start()

    async def submit(self, task: str, row: Row, params: dict[str, Any]) -> Output:
        return await self.enqueue(task, row, params)

    def enqueue(self, task: str, row: Row, params: dict[str, Any], on_tokens: OnTokens | None = None
                ) -> asyncio.Future:
        """Queue a request (from the event loop's thread); the future settles with its Output or error."""
        loop = asyncio.get_running_loop()
        request = Pending(task, row, params, loop, loop.create_future(), on_tokens)
        with self.wakeup:
            self.pending.append(request)
            self.wakeup.notify()
        return request.future

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
                results: list[Any] = self._run(batch)
            except BAD_INPUT:
                results = [self._alone(p) for p in batch]
            except Exception as e:  # noqa: BLE001 - the requests get the error, the batcher keeps serving
                results = [e] * len(batch)
            for request, result in zip(batch, results, strict=True):
                request.loop.call_soon_threadsafe(_settle, request.future, result)

    def _run(self, batch: list[Pending]) -> list[Output]:
        streams = [p.on_tokens for p in batch]
        return self.run([p.task for p in batch], [p.row for p in batch], batch[0].params,
                        **({"on_tokens": streams} if any(streams) else {}))

    def _alone(self, request: Pending) -> Any:
        try:
            return self._run([request])[0]
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
    if not isinstance(body.get("stream", False), bool):
        raise PredictInputError(f"stream must be true or false, got {body['stream']!r}")
    options = body.get("stream_options")
    if options is not None and (not body.get("stream") or not isinstance(options, dict)
                                or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise PredictInputError(f'stream_options must be {{"include_usage": true|false}} with stream true, '
                                f"got {options!r:.80}")
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


def _tokenizer(python_model: Any, task: str) -> Any:
    """The tokenizer `task`'s rows are decoded with."""
    predictor = python_model.predictor
    return predictor.states[task].tokenizer if hasattr(predictor, "refs") else predictor.tokenizer


def _runner(python_model: Any) -> tuple[Callable[..., list[Output]], int]:
    """The batch function of a pyfunc model (single or multi-task) and its rows per request."""
    predictor = python_model.predictor
    if hasattr(predictor, "refs"):
        return predictor.generate, predictor.limits.max_rows
    limits = python_model.limits

    def run(tasks: list[str], rows: list[Row], params: dict[str, Any], **streams: Any) -> list[Output]:
        return predictor.generate(rows, params, limits, **streams)

    return run, limits.max_rows


def completion(model: str, output: Output) -> dict[str, Any]:
    """The chat.completion object of one generated row."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": output.text},
                     "finish_reason": output.finish_reason, "logprobs": None}],
        "usage": usage(output),
    }


def usage(output: Output) -> dict[str, int]:
    """OpenAI's token counts of one generated row."""
    return {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens,
            "total_tokens": output.prompt_tokens + output.completion_tokens}


def openai_error(message: str, status: int, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, code), status_code=status)


def error_body(message: str, status: int, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class RowFeed:
    """A streamed request's `on_tokens` (called in the batcher's thread): the row's text deltas handed
    to the request's event loop, the first call's even when empty (generation has started)."""

    def __init__(self, deltas: TextDeltas, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> None:
        self.deltas, self.loop, self.events, self.started, self.failed = deltas, loop, events, False, False

    def __call__(self, ids: list[int]) -> None:
        if self.failed:
            return
        try:
            delta = self.deltas.update(ids)
            if delta or not self.started:
                self.loop.call_soon_threadsafe(self.events.put_nowait, delta)
            self.started = True
        except Exception:  # noqa: BLE001 - the batch must go on; the final chunk still carries the text
            logger.exception("streaming a row's text failed; it gets the rest at its end")
            self.failed = True


async def stream_completion(batcher: Batcher, model: str, task: str, row: Row, params: dict[str, Any],
                            tokenizer: Any, include_usage: bool) -> Any:
    """A streamed completion: a JSON error if the request fails before generating, else its SSE stream."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    deltas = TextDeltas(tokenizer, parse_params(params)[1].stop)
    future = batcher.enqueue(task, row, params, RowFeed(deltas, loop, events))
    future.add_done_callback(events.put_nowait)  # after the deltas: they were queued first
    first = await events.get()
    if first is future and future.exception() is not None:
        raise future.exception()  # before any token: the same 400 (or 500) as a whole completion
    return StreamingResponse(_sse(model, first, events, future, deltas, include_usage),
                             media_type="text/event-stream")


async def _sse(model: str, first: Any, events: asyncio.Queue, future: asyncio.Future, deltas: TextDeltas,
               include_usage: bool) -> AsyncIterator[str]:
    """The events of a streamed completion: role, content deltas, the rest and the finish_reason, usage."""
    chunk = ChunkMaker(model, include_usage)
    yield chunk({"role": "assistant", "content": ""})
    item = first
    while item is not future:
        if item:
            yield chunk({"content": item})
        item = await events.get()
    try:
        output: Output = future.result()
    except Exception as e:  # noqa: BLE001 - the stream has begun: the error is its last event
        logger.exception("a streamed completion failed")
        yield _event(error_body(f"{type(e).__name__}: {e}".splitlines()[0], 500))
        return
    rest = deltas.finish(output.text)
    if rest:
        yield chunk({"content": rest})
    yield chunk({}, output.finish_reason)
    if include_usage:
        yield chunk(None, usage=usage(output))
    yield "data: [DONE]\n\n"


class ChunkMaker:
    """The `chat.completion.chunk` events of one streamed completion (one id and creation time)."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model, self.include_usage = model, include_usage
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def __call__(self, delta: dict[str, Any] | None, finish_reason: str | None = None,
                 usage: dict[str, int] | None = None) -> str:
        """One chunk's event: a choice with `delta`, or (delta None) no choices and the usage."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                              "logprobs": None}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices}
        return _event({**body, "usage": usage} if self.include_usage else body)


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


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
        task = models[body["model"]]
        try:
            params = chat_params(body)
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return await stream_completion(batcher, body["model"], task, body["messages"], params,
                                               _tokenizer(python_model, task), include_usage)
            output = await batcher.submit(task, body["messages"], params)
        except BAD_INPUT as e:
            return openai_error(str(e), 400)
        return completion(body["model"], output)
