"""An adapter on its base with the prompt settings it was trained with: raw texts in, outputs out.

    from lora_module.serving.predictor import AdapterPredictor, load_adapter_with_base
    model, tokenizer = load_adapter_with_base("runs/x/adapter")       # the adapter's recorded base
    predictor = AdapterPredictor.from_adapter("runs/x/adapter")        # ... and its prompt settings
    predictor.predict(["#Person1#: Hi ..."], {"max_new_tokens": 64})
    predictor.generate([[{"role": "user", "content": "Hi"}]], {"temperature": 0.7, "seed": 1})  # Outputs

The one predict path: the pyfunc models, `lora-pipeline predict`, `serving.load_predictor` and the
OpenAI routes use it. Rows are texts or conversations (`Row`); params are checked here
(`parse_params`: greedy by default, sampling with temperature / top_p / seed, stop strings); a
served model holds each request to its `ServingLimits` (rows, characters, tokens, beams) and stops
generating at its deadline (`RequestStops`, a transformers stopping criterion on wall time).

The prompt template and lengths come from the adapter itself (its sidecar, written at export or
registration: `adapter_io.read_prompt_settings`); an adapter without them is refused rather than
guessed at. Decoding is greedy by default, exactly as in evaluation (`evaluation.generation`).
A base loaded here goes to CUDA where available, in bf16 where the GPU supports it (fp16 on older
GPUs) with TF32 and SDPA on; on CPU it stays as saved (`inference_base`, `lora_module.device`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lora_module import contracts
from lora_module.config import torch_dtype
from lora_module.device import AUTO, enable_cuda_fast_paths, generation_dtype, resolve_device
from lora_module.errors import AdapterLoadError, PipelineError, SettingsError
from lora_module.prompt import PromptSettings

# Decoding settings a caller may pass as predict params (defaults: GenerationConfig's, greedy).
GENERATION_PARAMS = ("max_new_tokens", "num_beams", "batch_size")
# Sampling and stopping: temperature > 0 samples; seed makes a sampled request repeatable.
SAMPLING_PARAMS = ("temperature", "top_p", "seed", "stop")
PREDICT_PARAMS = (*GENERATION_PARAMS, *SAMPLING_PARAMS)
MAX_STOP_STRINGS = 16
# The global RNG is shared: sampled requests run one at a time, so a seeded one repeats exactly.
_SAMPLING_LOCK = threading.Lock()
# Set when the server shuts down: every generation stops at its next token (`serving.server`).
STOP_ALL = threading.Event()
logger = logging.getLogger(__name__)


class PredictInputError(PipelineError, ValueError):
    """Bad predict input or params: unknown or out-of-range params, texts that are not strings, a
    request above a serving limit (names the parameter, the value and the limit)."""


class MissingPromptError(PipelineError, ValueError):
    """An adapter that does not say which prompt template and lengths it was trained with."""


@dataclass(frozen=True)
class Sampling:
    """How a request picks tokens and where it stops, beyond GenerationConfig (greedy by default)."""

    temperature: float = 0.0
    """0: greedy; above 0: sample with this temperature."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest token set with this much probability (sampling only)."""
    seed: int | None = None
    """Seed of the sampling RNG: the same request with the same seed gives the same output."""
    stop: tuple[str, ...] = ()
    """Strings that end a row's output (not included in it)."""

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


def _number(name: str, value: Any, kind: type) -> Any:
    """`value` as a finite `kind` (int or float; numpy scalars and numeric strings too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | str):
        raise PredictInputError(f"param {name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError as e:
        raise PredictInputError(f"param {name} must be a number, got {value!r}") from e
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        raise PredictInputError(f"param {name} must be a finite {kind.__name__}, got {value!r}")
    return int(value if isinstance(value, numbers.Integral) else number) if kind is int else number


def _stop_strings(value: Any) -> tuple[str, ...]:
    """A stop string or a list of them (empty: none)."""
    stops = [value] if isinstance(value, str) else list(value) if _is_sequence(value) else None
    if stops is None or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise PredictInputError(f"param stop must be a non-empty string or a list of at most "
                                f"{MAX_STOP_STRINGS} of them, got {value!r}")
    return tuple(stops)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "ndarray"


def parse_params(params: dict[str, Any] | None) -> tuple[Any, Sampling]:
    """(GenerationConfig, Sampling) from predict params; PredictInputError names the first bad one."""
    from lora_module.evaluation.generation import GenerationConfig

    params = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(params) - set(PREDICT_PARAMS))
    if unknown:
        raise PredictInputError(f"unknown predict params {unknown}; valid: {sorted(PREDICT_PARAMS)}")
    sampling = Sampling(
        temperature=_number("temperature", params.get("temperature", 0.0), float),
        top_p=_number("top_p", params.get("top_p", 1.0), float),
        seed=None if "seed" not in params else _number("seed", params["seed"], int),
        stop=_stop_strings(params["stop"]) if "stop" in params else (),
    )
    if sampling.temperature < 0:
        raise PredictInputError(f"param temperature must be >= 0 (0: greedy), got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise PredictInputError(f"param top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.seed is not None and not 0 <= sampling.seed < 2**63:
        raise PredictInputError(f"param seed must be in [0, 2**63), got {sampling.seed}")
    try:
        gen = GenerationConfig(**{k: _number(k, params[k], int) for k in GENERATION_PARAMS if k in params})
    except SettingsError as e:
        raise PredictInputError(f"predict params: {e}") from e
    return gen, sampling


def prompt_settings(adapter_dir: str | Path) -> PromptSettings:
    """The prompt settings recorded in the adapter's sidecar; MissingPromptError when it has none."""
    from lora_module.adapter_io import read_prompt_settings

    settings = read_prompt_settings(Path(adapter_dir))
    if settings is None:
        raise MissingPromptError(
            f"adapter {adapter_dir} records no prompt settings ({contracts.ADAPTER_SIDECAR_FILE} has no "
            "'prompt'): export it with `lora-pipeline fit`, or register it with `lora-pipeline register "
            "TASK ADAPTER --prepared PREPARED_DIR` to take them from the data it was trained on")
    return settings


def inference_base(base: str | Path, *, quantize: str | None = None, device: str | torch.device = AUTO,
                   dtype: str | None = AUTO) -> tuple[Any, torch.device]:
    """`(base model, device)`: the base loaded for generation in `dtype` ('auto': lora_module.device's
    choice for `device`; an explicit name wins), with SDPA attention and TF32 on CUDA. The caller moves
    the model to the device once its adapters are on (a 4-bit base on CUDA is already there)."""
    from lora_module import load_base_model

    where = resolve_device(device)
    enable_cuda_fast_paths(where)
    dtype = generation_dtype(where, dtype)
    model = load_base_model(str(base), quantize=quantize, torch_dtype=torch_dtype(dtype), device=where)
    return model, where


def load_adapter_with_base(
    adapter_dir: str | Path,
    base: Any = None,
    force: bool = False,
    tokenizer_dir: str | Path | None = None,
    adapter_name: str = "default",
    quantize: str | None = None,
    device: str | torch.device = AUTO,
    dtype: str | None = AUTO,
) -> tuple[Any, Any]:
    """`(LoraModel, tokenizer)`: base (`base` path/model, else the adapter's recorded base) + adapter.

    A base whose weights fingerprint differs from the adapter's is refused
    (FingerprintMismatchError) unless `force`. `quantize="nf4"` loads a path base in 4 bit. A path
    base is loaded by `inference_base` (`device`, `dtype`) and the model moved to that device; a model
    given as `base` is used where and as it is. The tokenizer comes from `tokenizer_dir`, else the
    adapter folder if it holds one, else the base.
    """
    from transformers import AutoTokenizer

    from lora_module import FingerprintMismatchError, LoraModel, read_adapter_config

    adapter_dir = Path(adapter_dir)
    base = base if base is not None else read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if base is None:
        raise AdapterLoadError(
            f"adapter {adapter_dir} records no base_model_name_or_path; pass the base explicitly")
    base_model, where = (inference_base(base, quantize=quantize, device=device, dtype=dtype)
                         if isinstance(base, str | Path) else (base, None))
    try:
        model = LoraModel.from_pretrained(base_model, adapter_dir, adapter_name=adapter_name, force=force)
    except FingerprintMismatchError as e:
        raise FingerprintMismatchError(
            f"refusing to load adapter {adapter_dir} onto base "
            f"{base if isinstance(base, str | Path) else type(base).__name__}: "
            f"{e}. Use the base it was trained on, or force=True (CLI --force) to load it anyway"
        ) from e
    if where is not None:
        model.to(where)
    model.eval()
    if tokenizer_dir is None:
        if any((adapter_dir / f).is_file() for f in contracts.TOKENIZER_FILES):
            tokenizer_dir = adapter_dir
        elif isinstance(base, str | Path):
            tokenizer_dir = base
        else:
            tokenizer_dir = getattr(base_model.config, "_name_or_path", None)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return model, tokenizer


@dataclass(frozen=True)
class ServingLimits:
    """What one request may ask of a served model; above a limit it gets HTTP 400 naming the limit.

    Each limit is the model_config key of its name, else the environment variable in `LIMIT_ENV`
    (what `lora-pipeline serve-model --max-rows ...` sets), else the default below."""

    max_rows: int = 256
    """Rows per request."""
    max_input_chars: int = 20_000
    """Characters of one row's input (a text, or a conversation's contents together)."""
    max_new_tokens: int = 1024
    """Generated tokens per row (the param, or the trained target length when not given)."""
    max_total_tokens: int = 32_768
    """Generated tokens per request: rows x max_new_tokens."""
    max_num_beams: int = 8
    """Beam width (each beam costs as much as a row)."""
    deadline_seconds: float = 30.0
    """Wall time a request may generate; then every row stops where it is (logged, finish "length").
    0: no deadline."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None,
                    environ: Mapping[str, str] = os.environ) -> ServingLimits:
        """Limits from model_config keys, else LIMIT_ENV variables, else the defaults."""
        config, values = config or {}, {}
        for f in fields(cls):
            given = config.get(f.name, environ.get(LIMIT_ENV[f.name]))
            if given in (None, ""):
                continue
            where = f"model_config {f.name}" if f.name in config else f"${LIMIT_ENV[f.name]}"
            try:
                value = (float if f.name == "deadline_seconds" else int)(given)
            except (TypeError, ValueError):
                value = -1
            if value < (0 if f.name == "deadline_seconds" else 1) or not math.isfinite(value):
                raise SettingsError(f"{where} is {given!r}; give a whole number >= 1"
                                    if f.name != "deadline_seconds" else
                                    f"{where} is {given!r}; give seconds >= 0 (0: no deadline)")
            values[f.name] = value
        return cls(**values)

    def check_rows(self, chars: list[int]) -> None:
        """Rows per request and characters per row (one count per row)."""
        if len(chars) > self.max_rows:
            raise PredictInputError(f"the request has {len(chars)} rows; the limit is {self.max_rows} "
                                    "(max_rows)")
        for i, n in enumerate(chars):
            if n > self.max_input_chars:
                raise PredictInputError(f"row {i}: text has {n} characters; the limit is "
                                        f"{self.max_input_chars} (max_input_chars)")

    def check_decoding(self, new_tokens: list[int], num_beams: int) -> None:
        """Generated tokens per row (one limit per row), their sum, and the beam width."""
        if num_beams > self.max_num_beams:
            raise PredictInputError(f"num_beams is {num_beams}; the limit is {self.max_num_beams} "
                                    "(max_num_beams)")
        if max(new_tokens, default=0) > self.max_new_tokens:
            raise PredictInputError(f"max_new_tokens is {max(new_tokens)}; the limit is "
                                    f"{self.max_new_tokens} (max_new_tokens)")
        if sum(new_tokens) > self.max_total_tokens:
            raise PredictInputError(f"the request may generate {sum(new_tokens)} tokens ({len(new_tokens)} "
                                    f"rows x max_new_tokens); the limit is {self.max_total_tokens} "
                                    "(max_total_tokens): send fewer rows or a smaller max_new_tokens")

    def deadline(self) -> float | None:
        """The `time.monotonic()` at which a request starting now stops generating (None: never)."""
        return time.monotonic() + self.deadline_seconds if self.deadline_seconds else None


LIMIT_ENV = {f.name: f"LORA_{f.name.upper()}" for f in fields(ServingLimits)}


class RequestStops(StoppingCriteria):
    """Stops a `generate` call at the request's deadline or on STOP_ALL (every row; `cut` is set), each
    row at its first stop string (its text from column `start` on); streams rows' ids (`on_tokens`)."""

    def __init__(self, jobs: list[RowJob], stop: tuple[str, ...], deadline: float | None, start: int) -> None:
        self.tokenizer, self.stop, self.deadline, self.start = jobs[0].tokenizer, stop, deadline, start
        self.cut, self.feeds = False, [(r, j) for r, j in enumerate(jobs) if j.on_tokens and j.num_beams < 2]

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if STOP_ALL.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline):
            self.cut = True
            return ~done
        for row, job in self.feeds:
            job.on_tokens(input_ids[row, self.start :][: job.max_new_tokens].tolist())
        for row, ids in enumerate(input_ids[:, self.start :] if self.stop else []):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            done[row] = any(s in text for s in self.stop)
        return done


@dataclass
class RowJob:
    """One row ready to generate: adapter (None: the model as it is), prompt token ids, its own
    decoding limits, its tokenizer, and what is called each step with its generated ids (streaming)."""

    adapter: str | None
    ids: list[int]
    max_new_tokens: int
    num_beams: int
    tokenizer: Any = field(repr=False)
    on_tokens: Callable[[list[int]], None] | None = field(default=None, repr=False)


@dataclass
class Output:
    """One row's generation: the text and why it ended, as OpenAI reports it."""

    text: str
    finish_reason: str
    """"stop": end of sequence or a stop string; "length": max_new_tokens or the deadline."""
    prompt_tokens: int
    completion_tokens: int


# A row's input: a raw text (the task's template is applied), or a conversation
# ([{"role", "content"}, ...] ending with a user turn: `PromptSettings.render_conversations`).
Row = str | list[dict[str, str]]


def row_chars(row: Any) -> int:
    """Characters of a row's input: a text's, or the contents of a conversation's turns together."""
    if isinstance(row, str):
        return len(row)
    return sum(len(str(turn.get("content") or "")) for turn in row if isinstance(turn, Mapping))


def check_row(row: Any, where: str) -> Row:
    """`row` as a text or a checked conversation (ShareGPT turns mapped); PredictInputError naming
    `where` otherwise."""
    from lora_module.prompt import PromptError, normalize_messages, validate_messages

    if isinstance(row, str):
        return row
    if not _is_sequence(row):
        raise PredictInputError(f"{where}: give a text (string) or messages (a list of "
                                f"{{'role', 'content'}} turns), got {type(row).__name__}")
    messages = normalize_messages([dict(turn) if isinstance(turn, Mapping) else turn for turn in row])
    try:
        validate_messages(messages, f"{where} messages")
    except PromptError as e:
        raise PredictInputError(str(e)) from e
    return messages


def render_rows(prompt: PromptSettings, rows: list[Row], tokenizer: Any) -> list[str]:
    """Each row's prompt, in order: texts through `prompt.render`, conversations through
    `prompt.render_conversations` (both cut to max_source_length as in training)."""
    out = [""] * len(rows)
    texts = [i for i, row in enumerate(rows) if isinstance(row, str)]
    chats = [i for i, row in enumerate(rows) if not isinstance(row, str)]
    for where, render in ((texts, prompt.render), (chats, prompt.render_conversations)):
        if where:
            for i, text in zip(where, render([rows[i] for i in where], tokenizer), strict=True):
                out[i] = text
    return out


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to its first stop string (excluded), and whether one was found."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


def _decode_row(job: RowJob, tokens: torch.Tensor, stop: tuple[str, ...], pad_id: int) -> Output:
    tokens = tokens[: job.max_new_tokens]
    eos = job.tokenizer.eos_token_id
    ended = [i for i, t in enumerate(tokens.tolist()) if t in (eos, pad_id)]
    used = ended[0] if ended else len(tokens)
    text, stopped = cut_at_stop(job.tokenizer.decode(tokens, skip_special_tokens=True).strip(), stop)
    reason = "stop" if stopped or ended else "length"
    return Output(text.strip() if stopped else text, reason, len(job.ids), used + (1 if ended else 0))


@torch.inference_mode()
def generate_rows(model: Any, jobs: list[RowJob], batch_size: int, is_seq2seq: bool,
                  sampling: Sampling = Sampling(), deadline: float | None = None) -> list[Output]:
    """Generate every row with its own adapter, `batch_size` rows per `generate`; in input order.

    Rows are batched longest first (less padding); within a batch they are ordered by adapter, so
    each adapter's rows are one slice (no gathers). Beam search rows batch only with rows of the same
    beam width and length limit (a beam result cannot be cut to a shorter limit). At `deadline`
    (a `time.monotonic()` value) generation stops: rows keep what they have, and later batches none."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.num_beams, job.max_new_tokens if job.num_beams > 1 else 0), []).append(i)
    batches = []
    for rows in groups.values():
        rows.sort(key=lambda i: -len(jobs[i].ids))
        batches += [sorted(rows[start : start + batch_size], key=lambda i: jobs[i].adapter or "")
                    for start in range(0, len(rows), batch_size)]
    outputs: dict[int, Output] = {}
    cut = 0
    with _SAMPLING_LOCK if sampling.temperature > 0 else contextlib.nullcontext():
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        for batch in batches:
            done, stopped = _generate_batch(model, [jobs[i] for i in batch], is_seq2seq, sampling, deadline)
            outputs.update(zip(batch, done, strict=True))
            cut += len(batch) if stopped else 0
    if cut:
        logger.warning("generation stopped at the deadline (deadline_seconds): %d of %d rows cut",
                       cut, len(jobs))
    return [outputs[i] for i in range(len(jobs))]


def _generate_batch(model: Any, batch: list[RowJob], is_seq2seq: bool, sampling: Sampling,
                    deadline: float | None) -> tuple[list[Output], bool]:
    """One `generate` call: the rows' outputs, and whether the deadline cut them."""
    from lora_module.evaluation.generation import pad_batch, pad_token_id

    if STOP_ALL.is_set() or (deadline is not None and time.monotonic() >= deadline):
        return [Output("", "length", len(job.ids), 0) for job in batch], True
    pad_id = pad_token_id(batch[0].tokenizer)
    input_ids, attention = pad_batch([job.ids for job in batch], pad_id, left=not is_seq2seq)
    stops = RequestStops(batch, sampling.stop, deadline, 1 if is_seq2seq else input_ids.shape[1])
    device = next(model.parameters()).device
    adapters = [job.adapter for job in batch]
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), num_beams=batch[0].num_beams,
        max_new_tokens=max(job.max_new_tokens for job in batch), pad_token_id=pad_id,
        stopping_criteria=StoppingCriteriaList([stops]), **sampling.generate_kwargs(),
        **({"adapter_names": adapters} if any(a is not None for a in adapters) else {}),
    )
    out = out[:, 1:] if is_seq2seq else out[:, input_ids.shape[1] :]  # drop decoder start / prompt
    done = [_decode_row(job, out[row], sampling.stop, pad_id) for row, job in enumerate(batch)]
    if stops.cut:
        for output in done:
            output.finish_reason = "length"
    return done, stops.cut


@dataclass
class AdapterPredictor:
    """A loaded adapter with the prompt settings it was trained with: raw texts in, outputs out."""

    model: Any
    tokenizer: Any
    prompt: PromptSettings

    @classmethod
    def from_adapter(cls, adapter_dir: str | Path, max_source_length: int | None = None,
                     **load: Any) -> AdapterPredictor:
        """Load `adapter_dir` on its base (`load`: load_adapter_with_base's keywords) with its recorded
        prompt settings; `max_source_length` overrides the recorded limit (the difference is logged)."""
        prompt = prompt_settings(adapter_dir)
        if max_source_length is not None:
            prompt = replace(prompt, max_source_length=prompt.resolve("max_source_length", max_source_length))
        model, tokenizer = load_adapter_with_base(adapter_dir, **load)
        return cls(model, tokenizer, prompt)

    def predict(self, rows: list[Row], params: dict[str, Any] | None = None,
                limits: ServingLimits | None = None) -> list[str]:
        """The task's template applied to each text (or its chat template to each conversation),
        prompts cut as in training, greedy by default; `limits`: a served model's limits (a request
        above one is a PredictInputError)."""
        return [o.text for o in self.generate(rows, params, limits)]

    def generate(self, rows: list[Row], params: dict[str, Any] | None = None,
                 limits: ServingLimits | None = None,
                 on_tokens: list[Callable[[list[int]], None] | None] | None = None) -> list[Output]:
        """`predict`, with each row's finish reason and token counts (`on_tokens`: each row's, streaming)."""
        from lora_module.evaluation.generation import encode_prompts

        deadline = limits.deadline() if limits is not None else None
        rows = [check_row(row, f"row {i}") for i, row in enumerate(rows)]
        if limits is not None:
            limits.check_rows([row_chars(row) for row in rows])
        gen, sampling = parse_params(params)
        gen = gen.with_settings(self.prompt)
        if limits is not None:
            limits.check_decoding([gen.max_new_tokens] * len(rows), gen.num_beams)
        # Over-long inputs lose their end, not the template's instruction (as the data stage cut them).
        prompt = replace(self.prompt, max_source_length=gen.max_source_length)
        is_seq2seq = bool(getattr(self.model.config, "is_encoder_decoder", False))
        ids = encode_prompts(self.tokenizer, render_rows(prompt, rows, self.tokenizer), gen.max_source_length,
                             is_seq2seq, add_special_tokens=gen.add_special_tokens)
        jobs = [RowJob(None, row, gen.max_new_tokens, gen.num_beams, self.tokenizer, call)
                for row, call in zip(ids, on_tokens or [None] * len(ids), strict=True)]
        return generate_rows(self.model, jobs, gen.batch_size, is_seq2seq, sampling, deadline)
