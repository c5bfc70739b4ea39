"""A chat task end to end on the tiny chat Llama (#22 item 6): task spec -> the `lora-task` flow ->
registered version -> `lora-pipeline predict --json` -> `lora-pipeline serve-model` over HTTP, where
MLflow's `/invocations` (a `messages` row) and the official `openai` client (`model` = the task) answer
what `predict` answered for the same conversation (greedy).

    .venv/bin/pytest tests/test_chat_e2e.py -q

The spec, its data config (a `messages` JSONL file, prompt_format chat, a system prompt) and the data
all live in tmp_path; training is the shipped chat LoRA config (all-linear preset) for 2 steps, no
full fine-tuning. `predict --text` takes a text, which a chat task renders as one user turn after the
system prompt: the HTTP requests send that conversation as `messages`. A multi-turn conversation goes
to `predict --file` as a JSONL `messages` row, and to the server both ways, with the model named
`task@alias`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from serving_helpers import ServeProcess

from lora_module.contracts import MANIFEST_FILE
from lora_pipeline.flows.cli import main as lora_pipeline

REPO = Path(__file__).resolve().parents[1]
TASK = "chat_e2e"
TRAIN = ["--trainer.max_steps", "2", "--data.batch_size", "4", "--trainer.enable_progress_bar", "false",
         "--trainer.log_every_n_steps", "1"]
NEW_TOKENS = 8
QUESTION = "book a table for 5 people"
MULTI_TURN = [{"role": "user", "content": "book a table for 2 people"},
              {"role": "assistant", "content": "agreed see you soon"},
              {"role": "user", "content": "the price is 2 dollars"}]


def write_task(folder: Path, base: Path) -> Path:
    """A chat task spec, its data config and 20 two-exchange conversations, all under `folder`."""
    rows = [{"messages": [{"role": "user", "content": f"book a table for {i} people"},
                          {"role": "assistant", "content": "agreed see you soon"},
                          {"role": "user", "content": f"the price is {i} dollars"},
                          {"role": "assistant", "content": f"thanks {i} dollars"}]} for i in range(20)]
    data_file = folder / "chat.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_config = folder / "data_chat_e2e.yaml"
    data_config.write_text(yaml.safe_dump({
        "name": TASK, "source": "files", "files": {"train": str(data_file)}, "prompt_format": "chat",
        "messages_column": "messages", "system_prompt": "be brief", "max_source_length": 96,
        "max_target_length": 16, "validation_size": 2, "test_size": 3,
    }))
    spec = folder / f"{TASK}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": TASK, "data_config": str(data_config),
        "lora_config": str(REPO / "deploy" / "configs" / "demo_chat_lora.yaml"), "base_model": str(base),
        "generation": {"batch_size": 4, "max_new_tokens": NEW_TOKENS}, "train_overrides": TRAIN,
    }))
    return spec


def predict_json(capsys, store: str, *args: str) -> list[dict]:
    """`lora-pipeline predict TASK ARGS --json`, in process."""
    capsys.readouterr()
    status = lora_pipeline(["predict", TASK, *args, "--max-new-tokens", str(NEW_TOKENS), "--json",
                            "--tracking-uri", store])
    out = capsys.readouterr().out
    assert status == 0, out
    return json.loads(out)


# One flow run (Prefect harness, training, evaluation, registration) and one server process: 60-115 s
# measured on the busy 2-core machine.
@pytest.mark.slow
@pytest.mark.integration
def test_chat_task_flow_register_predict_and_serve(harness, tmp_path, chat_llama_dir, capsys):
    openai = pytest.importorskip("openai", reason="the openai client is a test dependency (.[dev])")
    from lora_pipeline.flows.pipeline import task_pipeline

    home = tmp_path / "home"  # ServeProcess points the server at the same home (cwd / "home")
    store = f"sqlite:///{home / 'mlflow.db'}"
    result = task_pipeline(task=str(write_task(tmp_path, chat_llama_dir)), home=str(home))
    assert result["task"] == TASK and result["model_name"] == f"{TASK}-lora" and result["version"] == "1"
    assert set(result["rouge"]) == {"base", "lora"}
    manifest = json.loads((Path(result["prepared_dir"]) / MANIFEST_FILE).read_text())
    assert manifest["config"]["prompt_format"] == "chat"

    (row,) = predict_json(capsys, store, "--version", result["version"], "--text", QUESTION)
    answer = row["output"]
    assert row["input"] == QUESTION and answer.strip(), row  # a non-empty answer makes "equal" mean something

    # A conversation, and the same question as a one-turn conversation, from a JSONL file.
    alias = result["alias"]  # champion or challenger: the gate's verdict on a 2-step adapter
    rows = tmp_path / "conversations.jsonl"
    rows.write_text("".join(json.dumps({"messages": m}) + "\n"
                            for m in (MULTI_TURN, [{"role": "user", "content": QUESTION}])))
    multi, single = predict_json(capsys, store, "--alias", alias, "--file", str(rows))
    multi_answer = multi["output"]
    assert multi["input"] == MULTI_TURN and multi_answer.strip() and single["output"] == answer

    with ServeProcess(f"models:/{TASK}-lora@{alias}", tmp_path, "--tracking-uri", store) as server:
        one_turn = [{"role": "user", "content": QUESTION}]
        status, body = server.post("/invocations", {"dataframe_records": [{"messages": one_turn}],
                                                    "params": {"max_new_tokens": NEW_TOKENS}})
        assert status == 200 and body["predictions"] == [answer], body
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert sorted(m.id for m in client.models.list()) == [TASK, f"{TASK}@{alias}"]
        reply = client.chat.completions.create(model=TASK, messages=one_turn, max_tokens=NEW_TOKENS)
        assert reply.choices[0].message.content == answer

        status, body = server.post("/invocations", {"dataframe_records": [{"messages": MULTI_TURN}],
                                                    "params": {"max_new_tokens": NEW_TOKENS}})
        assert status == 200 and body["predictions"] == [multi_answer], body
        multi = client.chat.completions.create(model=f"{TASK}@{alias}", messages=MULTI_TURN,
                                               max_tokens=NEW_TOKENS)
        assert multi.choices[0].message.content == multi_answer
        assert multi.usage.prompt_tokens > reply.usage.prompt_tokens  # the earlier turns were rendered too
