"""Chat serving (#22 item 5): rows with `messages`, sampling params, and the OpenAI-compatible routes.

In process: a chat task's rows are rendered with the tokenizer's chat template (one BOS) and
generate what the evaluation's own `generate` does with that prompt; chat requests arriving together
run as ONE mixed-task batch (two adapters), a bad one in the batch getting its own 400. Over HTTP:
a real `lora-pipeline serve-model` process on a saved tiny chat Llama, driven with the official
`openai` client (non-streaming): models, completions equal to the in-process ones, seeded sampling,
stop strings, one-line 400s and a 404 for a model not served; `/invocations` takes `messages` rows;
the server runs two workers, and SIGTERM stops them all.

    .venv/bin/pytest tests/test_openai_endpoint.py -q
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from types import SimpleNamespace

import pytest
from serving_helpers import (
    LLAMA_TARGETS,
    ServeProcess,
    group_members,
    make_adapter,
    mixed_task_predictor,
    save_served_model,
)

from lora_module.prompt import PromptSettings
from lora_module.serving import openai_api
from lora_module.serving.multitask import TaskRef
from lora_module.serving.openai_api import Batcher, chat_params
from lora_module.serving.predictor import AdapterPredictor, PredictInputError, load_adapter_with_base

CHAT = PromptSettings(None, "dialogue", 96, 8, "causal", format="chat", system_prompt="Be brief.")
TOPIC = PromptSettings("Topic of: {dialogue}\nTopic:", "dialogue", 48, 4, "causal")
CONVERSATION = [{"role": "user", "content": "alice meets bob at the cafe"},
                {"role": "assistant", "content": "they talk"},
                {"role": "user", "content": "what do they order"}]


@pytest.fixture(scope="module")
def adapters(chat_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-adapters")
    return {"chat": make_adapter(chat_llama_dir, root / "chat", 11, CHAT, LLAMA_TARGETS),
            "topic": make_adapter(chat_llama_dir, root / "topic", 12, TOPIC, LLAMA_TARGETS)}


def test_chat_rows_use_the_chat_template_once(adapters):
    from lora_module.evaluation.generation import GenerationConfig, generate

    model, tokenizer = load_adapter_with_base(adapters["chat"])
    predictor = AdapterPredictor(model, tokenizer, CHAT)
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *CONVERSATION],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    config = GenerationConfig(max_new_tokens=8, add_special_tokens=False)
    expected = generate(model, tokenizer, [prompt], config)
    (output,) = predictor.generate([CONVERSATION], {"max_new_tokens": 8})
    assert output.text == expected[0] and output.prompt_tokens == len(ids)
    # A plain text row of a chat task is one user turn after the system prompt.
    one_turn = [{"role": "user", "content": "what do they order"}]
    assert predictor.predict(["what do they order"]) == predictor.predict([one_turn])


def test_chat_params_map_openai_fields():
    body = {"model": "chat", "messages": [], "max_tokens": 5, "temperature": 0.3, "stop": "\n", "seed": 1,
            "n": 1, "stream": False, "user": "u1"}
    assert chat_params(body) == {"max_new_tokens": 5, "temperature": 0.3, "stop": "\n", "seed": 1}
    for bad, message in [({"logit_bias": {}}, r"unsupported fields \['logit_bias'\]"),
                         ({"n": 2}, "n must be 1"), ({"stream": 1}, "stream must be true or false"),
                         ({"max_tokens": 1, "max_completion_tokens": 1}, "not both")]:
        with pytest.raises(PredictInputError, match=message):
            chat_params({"model": "chat", "messages": [], **bad})


def test_rows_take_messages_and_models_are_named_by_task():
    import pandas as pd

    from lora_module.serving.multitask import rows_from_input
    from lora_module.serving.openai_api import served_models
    from lora_module.serving.pyfunc import texts_from_input

    frame = pd.DataFrame({"task": ["chat", "topic"], "messages": [CONVERSATION, CONVERSATION[:1]]})
    assert rows_from_input(frame) == (["chat", "topic"], [CONVERSATION, CONVERSATION[:1]])
    assert texts_from_input(frame[["messages"]]) == [CONVERSATION, CONVERSATION[:1]]
    with pytest.raises(PredictInputError, match=r"needs columns 'task' and 'text' \(or 'messages'\)"):
        rows_from_input(pd.DataFrame({"task": ["chat"]}))
    multi = SimpleNamespace(predictor=SimpleNamespace(refs={"chat": TaskRef.parse("chat"),
                                                            "topic": TaskRef.parse("topic=3")}))
    assert served_models(multi, "models:/lora-tasks@champion") == {"chat": "chat", "chat@champion": "chat",
                                                                   "topic": "topic"}
    single = SimpleNamespace(predictor=SimpleNamespace())
    assert served_models(single, "models:/summary-lora@staging") == {"summary": "summary",
                                                                     "summary@staging": "summary"}
    assert served_models(single, "models:/summary-lora/4") == {"summary": "summary"}


def test_requests_arriving_together_run_as_one_mixed_task_batch(adapters, chat_llama_dir, monkeypatch):
    tokenizer = load_adapter_with_base(adapters["chat"])[1]
    predictor = mixed_task_predictor(chat_llama_dir, adapters, {"chat": CHAT, "topic": TOPIC}, tokenizer)
    calls = []

    def run(tasks, rows, params):
        calls.append(list(tasks))
        return predictor.generate(tasks, rows, params)

    monkeypatch.setattr(openai_api, "BATCH_WINDOW_SECONDS", 0.5)  # all four are queued by then
    requests = [("chat", CONVERSATION), ("topic", [{"role": "user", "content": "my laptop is broken"}]),
                ("chat", [{"role": "user", "content": "book a table"}]), ("topic", CONVERSATION)]

    async def send_all():
        batcher = Batcher(run, max_rows=16)
        return await asyncio.gather(*(batcher.submit(t, m, {"max_new_tokens": 6}) for t, m in requests),
                                    return_exceptions=True)

    results = asyncio.run(send_all())
    assert calls[0] == ["chat", "topic", "chat", "topic"]  # one mixed batch first ...
    assert len(calls) == 1 + 4  # ... whose bad row (a template task takes one message) re-ran each alone
    assert isinstance(results[3], Exception) and "send one user message" in str(results[3])
    good = [0, 1, 2]
    expected = predictor.generate([requests[i][0] for i in good], [requests[i][1] for i in good],
                                  {"max_new_tokens": 6})
    assert [results[i].text for i in good] == [o.text for o in expected]
    assert len({results[0].text, results[1].text}) == 2


# One server process: starting one takes 15-60 s on a busy 2-core machine (torch, MLflow, the model).
@pytest.mark.slow
@pytest.mark.integration
def test_openai_client_against_serve_model(adapters, tmp_path):
    openai = pytest.importorskip("openai", reason="the openai client is a test dependency (.[dev])")
    model, tokenizer = load_adapter_with_base(adapters["chat"])
    local = AdapterPredictor(model, tokenizer, CHAT)
    folder = save_served_model(tmp_path / "chat", adapters["chat"])
    with ServeProcess(folder, tmp_path, "--workers", "2", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"
                      ) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["chat"]
        reply = client.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=8)
        assert reply.choices[0].message.content == local.predict([CONVERSATION], {"max_new_tokens": 8})[0]
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 10
        sampled = [client.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=8,
                                                  temperature=1.5, top_p=0.9, seed=seed)
                   for seed in (4, 4)]
        assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content
        text = sampled[0].choices[0].message.content
        assert len(text) > 5, text
        cut = client.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=8,
                                             temperature=1.5, top_p=0.9, seed=4, stop=[text[3:5]]).choices[0]
        assert cut.message.content == text[: text.find(text[3:5])].strip() and cut.finish_reason == "stop"
        text = reply.choices[0].message.content
        _errors_are_one_line(openai, client)
        status, body = server.post("/invocations", {"dataframe_records": [{"messages": CONVERSATION}],
                                                    "params": {"max_new_tokens": 8, "stop": "zzzz"}})
        assert status == 200 and body["predictions"] == [text], body
        _sigterm_stops_the_workers(server)


def _sigterm_stops_the_workers(server: ServeProcess) -> None:
    """SIGTERM to `serve-model`'s pid (uvicorn's supervisor): its two workers go with it."""
    assert len(group_members(server.proc.pid)) >= 3  # supervisor + 2 workers (+ multiprocessing's tracker)
    os.kill(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while group_members(server.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(server.proc.pid) == [], server.log.read_text()[-2000:]


def _errors_are_one_line(openai, client) -> None:
    bad = [({"top_p": 2}, openai.BadRequestError, "param top_p must be in (0, 1]"),
           ({"model": "nope"}, openai.NotFoundError, "model 'nope' is not served here; served: ['chat']"),
           ({"messages": [{"role": "assistant", "content": "hi"}]}, openai.BadRequestError,
            "turn 0: role 'assistant' is out of order"),
           ({"max_tokens": 10**9}, openai.BadRequestError, "max_new_tokens is 1000000000; the limit is 1024")]
    for change, error, message in bad:
        request = {"model": "chat", "messages": CONVERSATION, **change}
        with pytest.raises(error) as info:
            client.chat.completions.create(**request)
        body = info.value.body
        assert message in body["message"] and "\n" not in body["message"], body
