"""Streamed chat completions (#22 item 5, the bonus): `stream: true` on `/v1/chat/completions`.

Unit: `streaming.TextDeltas` on token sequences of the byte-level test tokenizer (random ones, stop
strings across token boundaries, trailing spaces, characters split over tokens) and on a tokenizer
whose decoding rewrites earlier text: every prefix of the joined deltas is a prefix of the final text
`predictor._decode_row` gives, and the deltas plus `finish` are exactly that text. In process: the
deltas leave while the row still generates (generation waits for the client's first content chunk),
streamed and whole requests run as one batch, and a request that fails before generating is an
error, not a stream. Over HTTP (one `serve-model` process): the official `openai` client with
`stream=True` gets exactly the non-streamed answers (greedy, seeded sampling, a stop string), the role
first, the finish_reason last, `include_usage`'s usage; a raw read shows several content chunks and
`data: [DONE]`; a client that leaves mid-stream leaves the server serving; errors stay JSON 400/404.

    .venv/bin/pytest tests/test_openai_streaming.py -q
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
from serving_helpers import LLAMA_TARGETS, ServeProcess, make_adapter, mixed_task_predictor, save_served_model

from lora_module.prompt import PromptSettings
from lora_module.serving import openai_api
from lora_module.serving.openai_api import Batcher, chat_params, stream_completion
from lora_module.serving.predictor import (
    AdapterPredictor,
    PredictInputError,
    RowJob,
    _decode_row,
    load_adapter_with_base,
)
from lora_module.serving.streaming import TextDeltas

CHAT = PromptSettings(None, "dialogue", 96, 8, "causal", format="chat", system_prompt="Be brief.")
CONVERSATION = [{"role": "user", "content": "alice meets bob at the cafe"},
                {"role": "assistant", "content": "they talk"},
                {"role": "user", "content": "what do they order"}]


def stream_tokens(tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[list[str], str]:
    """(deltas, final text) of `ids` generated one by one, ending as `generate` ends a row: at the
    EOS or at the first step whose text holds a stop string (`predictor.RequestStops`)."""
    deltas, sent = TextDeltas(tokenizer, stop), []
    for k in range(1, len(ids) + 1):
        sent.append(deltas.update(ids[:k]))
        if ids[k - 1] == tokenizer.eos_token_id or any(
                s in tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stop):
            ids = ids[:k]
            break
    job = RowJob(None, [], len(ids), 1, tokenizer)
    final = _decode_row(job, torch.tensor(ids), stop, tokenizer.pad_token_id).text
    for i in range(len(sent)):
        assert final.startswith("".join(sent[: i + 1])), (sent[: i + 1], final)
    sent.append(deltas.finish(final))
    return sent, final


@pytest.fixture(scope="module")
def tokenizer(causal_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(causal_tokenizer_dir)


@pytest.mark.parametrize("stop", [(), ("e",), ("the c", "\n"), (" ",), ("\ufffd",), ("ab", "bob at")])
def test_deltas_of_random_tokens_join_to_the_final_text(tokenizer, stop):
    g = torch.Generator().manual_seed(len(stop))
    for _ in range(40):
        ids = torch.randint(len(tokenizer), (24,), generator=g).tolist()
        deltas, final = stream_tokens(tokenizer, ids, stop)
        assert "".join(deltas) == final


def test_stop_strings_across_tokens_are_never_sent(tokenizer):
    ids = tokenizer("alice meets bob at the cafe on monday", add_special_tokens=False)["input_ids"]
    deltas, final = stream_tokens(tokenizer, ids, ("bob at",))
    assert final == "alice meets" and "".join(deltas) == final
    assert not any("b" in d for d in deltas)  # not even the start of the stop string went out
    assert len([d for d in deltas if d]) >= 2  # ... while the text before it streamed
    # The tail that may start a stop string waits: "bob a" is held until "t" decides.
    partial = TextDeltas(tokenizer, ("bob at",))
    head = tokenizer("alice meets bob a", add_special_tokens=False)["input_ids"]
    assert "b" not in "".join(partial.update(head[:k]) for k in range(1, len(head) + 1))
    # Text from a stop string on never goes out, even if the row went on generating past it.
    past = TextDeltas(tokenizer, ("bob at",))
    assert "".join(past.update(ids[:k]) for k in range(1, len(ids) + 1)) == "alice meets"


def test_trailing_spaces_and_split_characters_wait(tokenizer):
    text = "  café   déjà vu  你好 summary  "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    decoded = [tokenizer.decode(ids[:k]) for k in range(1, len(ids))]
    assert any(d.endswith("\ufffd") for d in decoded)  # the tokenizer splits a character's bytes
    deltas, final = stream_tokens(tokenizer, ids, ())
    assert final == text.strip() and "".join(deltas) == final
    assert not any("\ufffd" in d for d in deltas)
    assert not deltas[0].startswith(" ") and all(not d.endswith(" ") for d in deltas[:-1] if d)


class RewritingTokenizer:
    """Decodes pieces joined, then as `clean_up_tokenization_spaces` does: "do n" + "'t" is "don't"."""

    eos_token_id = pad_token_id = 0
    pieces = ["", "i", " do", " n", "'t", " know", " ,", " ok", " "]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = "".join(self.pieces[i] for i in ids)
        return text.replace(" n't", "n't").replace(" ,", ",")


def test_deltas_wait_for_text_that_the_next_token_rewrites():
    tokenizer = RewritingTokenizer()
    deltas, final = stream_tokens(tokenizer, [1, 2, 3, 4, 5, 6, 7, 8, 0], ())
    assert final == "i don't know, ok" and "".join(deltas) == final


@pytest.fixture(scope="module")
def chat_adapter(chat_llama_dir, tmp_path_factory):
    return make_adapter(chat_llama_dir, tmp_path_factory.mktemp("stream-adapter") / "chat", 11, CHAT,
                        LLAMA_TARGETS)


@pytest.fixture(scope="module")
def local(chat_adapter):
    model, tokenizer = load_adapter_with_base(chat_adapter)
    return AdapterPredictor(model, tokenizer, CHAT)


def test_chat_params_take_stream_and_its_options():
    body = {"model": "chat", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    assert chat_params(body) == {}
    for bad, message in [({"stream": "yes"}, "stream must be true or false"),
                         ({"stream_options": {"include_usage": True}}, "with stream true"),
                         ({"stream": True, "stream_options": {"x": 1}}, "stream_options must be")]:
        with pytest.raises(PredictInputError, match=message):
            chat_params({"model": "chat", "messages": [], **bad})


async def _read(response) -> list[dict]:
    """The JSON events of a streamed response (`[DONE]` as the string)."""
    events = []
    async for line in response.body_iterator:
        assert line.startswith("data: ") and line.endswith("\n\n"), line
        data = line.removeprefix("data: ").strip()
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _content(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])


def test_deltas_leave_while_the_row_generates(local):
    """Generation waits (in the stopping criterion) until the client holds a content chunk: without
    real streaming it would time out and the test fail."""
    got_chunk, waited = threading.Event(), []
    params = {"max_new_tokens": 40}

    def run(tasks, rows, params, on_tokens=None):
        feed = on_tokens[0]

        def slow(ids):
            feed(ids)
            if feed.deltas.sent and not waited:
                waited.append(got_chunk.wait(10))
        return local.generate(rows, params, on_tokens=[slow])

    async def client():
        response = await stream_completion(Batcher(run, 4), "chat", "chat", CONVERSATION, params,
                                           local.tokenizer, True)
        assert response.media_type == "text/event-stream"
        events = []
        async for line in response.body_iterator:
            events.append(line)
            if '"content": "' in line and '"content": ""' not in line:
                got_chunk.set()
        return events

    lines = asyncio.run(client())
    assert waited == [True]
    events = [json.loads(line[6:]) if "[DONE]" not in line else "[DONE]" for line in lines]
    expected = local.generate([CONVERSATION], params)[0]
    assert _content(events[:-1]) == expected.text and events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == expected.completion_tokens


def test_streamed_and_whole_requests_batch_together(local, monkeypatch):
    calls = []

    def run(tasks, rows, params, on_tokens=None):
        calls.append([f is not None for f in on_tokens or [None] * len(rows)])
        return local.generate(rows, params, on_tokens=on_tokens)

    monkeypatch.setattr(openai_api, "BATCH_WINDOW_SECONDS", 0.5)  # all three are queued by then
    params = {"max_new_tokens": 12}
    short = [{"role": "user", "content": "book a table"}]

    async def send_all():
        batcher = Batcher(run, 8)
        whole = batcher.submit("chat", short, params)
        streams = [stream_completion(batcher, "chat", "chat", row, params, local.tokenizer, False)
                   for row in (CONVERSATION, short)]
        whole, *responses = await asyncio.gather(whole, *streams)
        return whole, [await _read(r) for r in responses]

    whole, (long_events, short_events) = asyncio.run(send_all())
    assert calls == [[False, True, True]]
    expected = local.generate([short, CONVERSATION, short], params)
    assert [whole.text, _content(long_events), _content(short_events)] == [o.text for o in expected]
    first, last = long_events[0]["choices"][0], long_events[-2]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""} and first["finish_reason"] is None
    assert last["delta"] == {} and last["finish_reason"] == expected[1].finish_reason
    assert "usage" not in long_events[-2]


def test_streams_of_several_tasks_batch_together(chat_adapter, chat_llama_dir, tmp_path, monkeypatch):
    topic = PromptSettings("Topic of: {dialogue}\nTopic:", "dialogue", 48, 4, "causal")
    adapters = {"chat": chat_adapter, "topic": make_adapter(chat_llama_dir, tmp_path / "topic", 12, topic,
                                                            LLAMA_TARGETS)}
    tokenizer = load_adapter_with_base(chat_adapter)[1]
    predictor = mixed_task_predictor(chat_llama_dir, adapters, {"chat": CHAT, "topic": topic}, tokenizer)
    calls = []

    def run(tasks, rows, params, on_tokens=None):
        calls.append(list(tasks))
        return predictor.generate(tasks, rows, params, on_tokens=on_tokens)

    monkeypatch.setattr(openai_api, "BATCH_WINDOW_SECONDS", 0.5)
    params, short = {"max_new_tokens": 10}, [{"role": "user", "content": "my laptop is broken"}]

    async def send_all():
        batcher = Batcher(run, 8)
        streams = [stream_completion(batcher, task, task, CONVERSATION if task == "chat" else short, params,
                                     tokenizer, True) for task in ("chat", "topic")]
        whole, *responses = await asyncio.gather(batcher.submit("topic", short, params), *streams)
        return whole, [await _read(r) for r in responses]

    whole, (chat_events, topic_events) = asyncio.run(send_all())
    assert calls == [["topic", "chat", "topic"]]
    expected = predictor.generate(["topic", "chat", "topic"], [short, CONVERSATION, short], params)
    assert [whole.text, _content(chat_events), _content(topic_events)] == [o.text for o in expected]
    assert _content(chat_events) != _content(topic_events)


def test_a_request_failing_before_generation_is_not_a_stream(local):
    async def send():
        batcher = Batcher(lambda tasks, rows, params, **streams: local.generate(rows, params, **streams), 4)
        return await stream_completion(batcher, "chat", "chat", [{"role": "assistant", "content": "hi"}],
                                       {}, local.tokenizer, False)

    with pytest.raises(PredictInputError, match="role 'assistant' is out of order"):
        asyncio.run(send())


# One server process for the HTTP tests: starting one takes 15-60 s on a busy 2-core machine.
@pytest.fixture(scope="module")
def server(chat_adapter, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream-serve")
    folder = save_served_model(tmp / "chat", chat_adapter)
    with ServeProcess(folder, tmp, "--tracking-uri", f"sqlite:///{tmp}/mlflow.db") as process:
        yield process


@pytest.mark.slow
@pytest.mark.integration
def test_openai_client_streams_the_answers_it_gives_whole(server, local):
    openai = pytest.importorskip("openai", reason="the openai client is a test dependency (.[dev])")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    greedy = client.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=16)
    text = greedy.choices[0].message.content
    assert text == local.predict([CONVERSATION], {"max_new_tokens": 16})[0] and len(text) > 5, text
    for change in ({}, {"temperature": 1.5, "top_p": 0.9, "seed": 4}, {"stop": [text[3:5]]}):
        request = {"model": "chat", "messages": CONVERSATION, "max_tokens": 16, **change}
        whole = client.chat.completions.create(**request)
        chunks = list(client.chat.completions.create(**request, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole.choices[0].message.content, (change, streamed)
        last = [c for c in chunks if c.choices][-1].choices[0]
        assert last.finish_reason == whole.choices[0].finish_reason and last.delta.content is None
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage, chunks[-1]
        assert all(c.usage is None for c in chunks[:-1])
    cut = client.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=16, stop=[text[3:5]])
    assert cut.choices[0].message.content == text[: text.find(text[3:5])].strip()


@pytest.mark.slow
@pytest.mark.integration
def test_raw_event_stream_and_what_is_not_streamed(server):
    import httpx

    request = {"model": "chat", "messages": CONVERSATION, "max_tokens": 24, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=request, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) > 1, lines
    # A client that leaves after the first event, while its row generates on: the server goes on answering.
    long = {**request, "max_tokens": 120}  # the tiny Llama has 256 positions
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=long, timeout=120) as response:
        next(response.iter_lines())
    status, body = server.post("/v1/chat/completions", {**request, "stream": False})
    assert status == 200 and body["choices"][0]["message"]["content"], body
    assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]
    # Errors found before generating stay JSON responses.
    for change, status_code, message in [({"top_p": 2}, 400, "param top_p must be in (0, 1]"),
                                         ({"model": "nope"}, 404, "model 'nope' is not served here"),
                                         ({"stream_options": {"include_usage": 1}}, 400, "stream_options")]:
        status, body = server.post("/v1/chat/completions", {**request, **change})
        assert status == status_code and message in body["error"]["message"], body
