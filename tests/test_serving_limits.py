"""Serving cannot be wedged by one request (#27 item 2): limits, a deadline that stops generating,
unknown params refused, and `serve-model` stopping cleanly on SIGTERM.

In process (seconds): the limits and their one-line messages, the params' checks, a deadline that
cuts a generation that would run for minutes, stop strings and seeded sampling. Over HTTP (one real
`lora-pipeline serve-model` process on a saved tiny-T5 model): huge requests get 400 at once, a
request stopped by the deadline does not delay the next good one, and SIGTERM to the server's pid
leaves no process of its group and a free port.

    .venv/bin/pytest tests/test_serving_limits.py -q
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest
from serving_helpers import T5_TARGETS, ServeProcess, group_members, make_adapter, save_served_model

from lora_module.errors import SettingsError
from lora_module.prompt import PromptSettings
from lora_module.serving.predictor import (
    AdapterPredictor,
    PredictInputError,
    ServingLimits,
    parse_params,
)
from lora_module.serving.server import check_params

PROMPT = PromptSettings("Summarize: {dialogue}", "dialogue", 24, 8, "seq2seq")
TEXTS = ["alice meets bob at the cafe", "the train leaves from platform four"]


@pytest.fixture(scope="module")
def t5_adapter(tiny_t5_dir, tmp_path_factory):
    return make_adapter(tiny_t5_dir, tmp_path_factory.mktemp("limits") / "adapter", 3, PROMPT, T5_TARGETS)


@pytest.fixture(scope="module")
def predictor(t5_adapter):
    return AdapterPredictor.from_adapter(t5_adapter)


def test_limits_come_from_model_config_then_environment():
    limits = ServingLimits.from_config({"max_rows": 3}, {"LORA_MAX_ROWS": "9", "LORA_MAX_NEW_TOKENS": "7",
                                                         "LORA_DEADLINE_SECONDS": "0"})
    assert (limits.max_rows, limits.max_new_tokens, limits.deadline_seconds) == (3, 7, 0.0)
    assert limits.deadline() is None and ServingLimits().deadline() is not None
    with pytest.raises(SettingsError, match=r"^\$LORA_MAX_ROWS is '0'; give a whole number >= 1$"):
        ServingLimits.from_config({}, {"LORA_MAX_ROWS": "0"})
    with pytest.raises(SettingsError, match=r"^model_config deadline_seconds is 'soon'; give seconds >= 0"):
        ServingLimits.from_config({"deadline_seconds": "soon"}, {})


@pytest.mark.parametrize(("params", "message"), [
    ({"bogus": 1}, r"unknown predict params \['bogus'\]; valid: \['batch_size', 'max_new_tokens', "),
    ({"temperature": -0.5}, r"param temperature must be >= 0 \(0: greedy\), got -0.5"),
    ({"temperature": "hot"}, r"param temperature must be a number, got 'hot'"),
    ({"top_p": 0}, r"param top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"param top_p must be in \(0, 1\], got 1.5"),
    ({"seed": -1}, r"param seed must be in \[0, 2\*\*63\), got -1"),
    ({"seed": 1.5}, r"param seed must be a finite int, got 1.5"),
    ({"stop": 5}, r"param stop must be a non-empty string or a list of at most 16 of them, got 5"),
    ({"stop": [""]}, r"param stop must be a non-empty string"),
    ({"max_new_tokens": 0}, r"GenerationConfig.max_new_tokens must be an integer >= 1"),
    ({"max_new_tokens": float("inf")}, r"param max_new_tokens must be a finite int, got inf"),
])
def test_bad_params_are_one_line(params, message):
    with pytest.raises(PredictInputError, match=message) as info:
        parse_params(params)
    assert "\n" not in str(info.value)


def test_serve_model_limit_flags_are_checked_and_exported(capsys, monkeypatch):
    from lora_module.serving.cli import serve_env
    from lora_pipeline.flows.cli import main as lora_pipeline

    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("no server may start"))
    assert lora_pipeline(["serve-model", "models:/m@champion", "--max-rows", "0"]) == 2
    assert "argument --max-rows: '0' is not an integer >= 1" in capsys.readouterr().err
    assert lora_pipeline(["serve-model", "models:/m@champion", "--deadline-seconds", "nan"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --deadline-seconds must be a number of seconds >= 0 "
                                               "(0: no deadline), got nan")
    env = serve_env("http://127.0.0.1:5000", None, None, 1, {"LORA_MAX_ROWS": "8"})
    assert ServingLimits.from_config({}, env).max_rows == 8


def test_server_refuses_params_the_model_does_not_take():
    allowed = {"max_new_tokens", "stop"}
    with pytest.raises(PredictInputError, match=r"unknown params \['temperature'\]; this model takes "
                                                r"\['max_new_tokens', 'stop'\]"):
        check_params(b'{"inputs": ["x"], "params": {"temperature": 0.2}}', allowed)
    body = json.loads(check_params(b'{"inputs": ["x"], "params": {"stop": "\\n"}}', allowed))
    assert body["params"]["stop"] == ["\n"]  # the signature's shape: a list
    assert check_params(b"not json", allowed) == b"not json"  # MLflow's own error for that


def test_requests_over_a_limit_are_refused_naming_it(predictor):
    limits = ServingLimits(max_rows=2, max_input_chars=50, max_new_tokens=16, max_total_tokens=20)
    cases = [
        (TEXTS * 2, {}, r"^the request has 4 rows; the limit is 2 \(max_rows\)$"),
        (["x" * 51], {}, r"^row 0: text has 51 characters; the limit is 50 \(max_input_chars\)$"),
        (TEXTS[:1], {"max_new_tokens": 10**9}, r"^max_new_tokens is 1000000000; the limit is 16"),
        (TEXTS[:1], {"max_new_tokens": 2**63}, r"^max_new_tokens is 9223372036854775808; the limit is 16"),
        (TEXTS, {"max_new_tokens": 16}, r"^the request may generate 32 tokens \(2 rows x max_new_tokens\); "
                                        r"the limit is 20 \(max_total_tokens\)"),
        (TEXTS[:1], {"num_beams": 9}, r"^num_beams is 9; the limit is 8 \(max_num_beams\)$"),
        ([[{"role": "user", "content": "x" * 60}]], {}, r"^row 0: text has 60 characters; the limit is 50"),
        ([[{"role": "assistant", "content": "hi"}]], {}, r"^row 0 messages, turn 0: role 'assistant' is out"),
    ]
    for rows, params, message in cases:
        with pytest.raises(PredictInputError, match=message):
            predictor.predict(rows, params, limits)
    # Within the limits the limits change nothing.
    params = {"max_new_tokens": 8}
    assert predictor.predict(TEXTS, params, limits) == predictor.predict(TEXTS, params)


def test_deadline_stops_a_generation_that_would_run_for_minutes(predictor, caplog):
    predictor.model.generation_config.eos_token_id = None  # nothing ends a row but the limits
    try:
        limits = ServingLimits(max_new_tokens=10**6, max_total_tokens=10**7, deadline_seconds=0.5)
        start = time.monotonic()
        outputs = predictor.generate(TEXTS, {"max_new_tokens": 10**6}, limits)
        took = time.monotonic() - start
    finally:
        predictor.model.generation_config.eos_token_id = predictor.tokenizer.eos_token_id
    assert took < 10, took  # 10**6 tokens per row would take hours
    assert [o.finish_reason for o in outputs] == ["length", "length"]
    assert all(0 < o.completion_tokens < 10**6 and o.text for o in outputs), outputs
    assert "generation stopped at the deadline (deadline_seconds): 2 of 2 rows cut" in caplog.text


def test_stop_strings_cut_the_output_and_seeds_repeat_sampling(predictor):
    greedy = predictor.generate(TEXTS[:1], {"max_new_tokens": 8})[0]
    assert len(greedy.text) > 4, greedy
    stop = greedy.text[3:5]
    cut = predictor.generate(TEXTS[:1], {"max_new_tokens": 8, "stop": [stop, "zzzz"]})[0]
    assert cut.text == greedy.text[: greedy.text.find(stop)].strip() and cut.finish_reason == "stop"
    sampled = [predictor.predict(TEXTS, {"temperature": 1.5, "seed": seed, "max_new_tokens": 8})
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    assert predictor.predict(TEXTS, {"temperature": 0, "seed": 3}) == predictor.predict(TEXTS)


def _port_is_free(port: int) -> bool:
    """Nothing listens on `port` (SO_REUSEADDR: the closed connections' TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# One server process: starting one takes 15-60 s on a busy 2-core machine (torch, MLflow, the model).
@pytest.mark.slow
@pytest.mark.integration
def test_one_request_cannot_wedge_the_server_and_sigterm_stops_it(t5_adapter, tmp_path):
    model = save_served_model(tmp_path / "summary", t5_adapter)
    server = ServeProcess(model, tmp_path, "--max-rows", "64", "--max-new-tokens", "4000",
                          "--max-total-tokens", "100000", "--deadline-seconds", "2",
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    try:
        server.wait_ready()
        good = {"dataframe_records": [{"text": t} for t in TEXTS]}
        assert server.post("/invocations", good)[0] == 200
        for payload, message in [
            ({"dataframe_records": [{"text": "hi"}] * 10_000}, "the request has 10000 rows; the limit is 64"),
            ({"dataframe_records": [{"text": "hi"}], "params": {"max_new_tokens": 10**9}},
             "max_new_tokens is 1000000000; the limit is 4000 (max_new_tokens)"),
            ({"dataframe_records": [{"text": "x" * 1_000_000}]},
             "text has 1000000 characters; the limit is 20000"),
            ({"dataframe_records": [{"text": "hi"}], "params": {"bogus": 1}}, "unknown params ['bogus']"),
            ({"dataframe_records": [{"text": "hi"}], "params": {"top_p": 2}},
             "param top_p must be in (0, 1]"),
        ]:
            start = time.monotonic()
            status, body = server.post("/invocations", payload)
            assert status == 400 and message in body["message"], (status, body)
            assert "\n" not in body["message"] and time.monotonic() - start < 30
        _long_request_does_not_delay_the_next(server, good)
        _sigterm_stops_every_process(server)
    finally:
        server.kill()


def _long_request_does_not_delay_the_next(server: ServeProcess, good: dict) -> None:
    """A request that may generate 64 x 1500 tokens ends at the 2 s deadline; one sent meanwhile is
    answered."""
    long = {"dataframe_records": [{"text": f"{t} {i}"} for i in range(32) for t in TEXTS],
            "params": {"max_new_tokens": 1500, "temperature": 0.0, "stop": "never-seen"}}
    answers: dict[str, tuple] = {}

    def send(name: str, payload: dict) -> None:
        start = time.monotonic()
        answers[name] = (*server.post("/invocations", payload), time.monotonic() - start)

    first = threading.Thread(target=send, args=("long", long))
    first.start()
    time.sleep(0.5)
    send("good", good)
    first.join(timeout=120)
    assert answers["long"][0] == 200 and len(answers["long"][1]["predictions"]) == 64
    assert answers["long"][2] < 2 + 25, answers["long"][2]  # the deadline, then decoding and JSON
    assert answers["good"][0] == 200 and answers["good"][2] < 2 + 25, answers["good"][2]


def _sigterm_stops_every_process(server: ServeProcess) -> None:
    """SIGTERM to the pid `serve-model` started as (the server itself, after execve): all of it exits."""
    assert group_members(server.proc.pid), "the server's process group is empty before SIGTERM"
    os.kill(server.proc.pid, signal.SIGTERM)
    # uvicorn shuts down, then re-raises the signal with its default action (status -SIGTERM).
    assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM), server.log.read_text()[-2000:]
    assert "Application shutdown complete" in server.log.read_text()
    deadline = time.monotonic() + 10
    while group_members(server.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(server.proc.pid) == [], "a process of the server outlived SIGTERM"
    assert _port_is_free(server.port)
