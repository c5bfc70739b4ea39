"""prompt_format chat: conversations rendered by the tokenizer's chat template, loss on assistant tokens only.

    .venv/bin/pytest tests/test_chat_data.py -q

On the tiny chat Llama (`chat_llama_dir`: the causal test tokenizer plus conftest's CHAT_TEMPLATE).
Expected ids and labels are built independently of the implementation: the rendered conversation is
written out by hand, cut into pieces at the template's turn boundaries and each piece tokenized on
its own (the byte-level tokenizer never merges across a newline), so masking is checked token by
token. Also: no double BOS, truncation (oldest turns, then the input, never the generation prompt),
the data stage's one-line errors, the manifest/sidecar settings, evaluation's encoding, `inspect`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lora_module.evaluation.generation import GenerationConfig, encode_prompts, generate
from lora_module.prompt import PromptError, PromptSettings, validate_messages
from lora_module.training.datamodule import PreparedDataModule, prompt_length
from lora_pipeline.data import DataConfig, prepare
from lora_pipeline.data.chat import assistant_labels
from lora_pipeline.data.cli import summary
from lora_pipeline.data.inspection import inspect_source

SYSTEM = "please be brief"


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def conversation(i: int, turns: int = 2) -> list[dict[str, str]]:
    """user/assistant pairs about row i (distinct rows, so nothing is dropped as a duplicate)."""
    out = []
    for t in range(turns):
        out += [{"role": "user", "content": f"can you book a table for {i} people on day {t}"},
                {"role": "assistant", "content": f"the price is {i + t} dollars see you soon"}]
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_config(tmp_path: Path, model_dir: Path, rows: list[dict], file: str = "c.jsonl", **kw) -> DataConfig:
    fields = {"name": "chat", "source": "files", "files": {"train": str(write_jsonl(tmp_path / file, rows))},
              "prompt_format": "chat", "messages_column": "messages", "tokenizer": str(model_dir),
              "output_root": str(tmp_path / "out"), "max_source_length": 256, "max_target_length": 32,
              "validation_size": 2, "test_size": 2} | kw
    return DataConfig(**fields)


@pytest.fixture(scope="module")
def tok(chat_llama_dir):
    return AutoTokenizer.from_pretrained(chat_llama_dir)


def pieces_to_ids(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Expected (ids, labels): each piece tokenized alone, labelled when its flag is set."""
    ids, labels = [], []
    for text, trained in pieces:
        p = tok(text, add_special_tokens=False)["input_ids"]
        ids += p
        labels += p if trained else [-100] * len(p)
    return ids, labels


def hand_rendered(messages: list[dict[str, str]], last_only: bool) -> list[tuple[str, bool]]:
    """CHAT_TEMPLATE written out by hand: pieces of text, flagged when training learns them."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    learnt = assistant[-1:] if last_only else assistant
    pieces, pending = [], "<s>"
    for i, m in enumerate(messages):
        pending += f"<|{m['role']}|>\n"
        if i in learnt:  # the reply and its end-of-turn token; not the newline after it
            pieces += [(pending, False), (m["content"] + "</s>", True)]
            pending = "\n"
        else:
            pending += m["content"] + "</s>\n"
    return pieces + ([(pending, False)] if pending else [])


# ---- masking, token by token ---------------------------------------------------------------


@pytest.mark.parametrize("last_only", [False, True])
def test_assistant_tokens_labelled_everything_else_ignored(tok, last_only):
    messages = [{"role": "system", "content": SYSTEM}, *conversation(3, turns=3)]
    ids, labels = assistant_labels(tok, messages, last_only=last_only)
    want_ids, want_labels = pieces_to_ids(tok, hand_rendered(messages, last_only))
    assert ids == want_ids
    assert labels == want_labels
    learnt = tok.decode([x for x in labels if x != -100])
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert learnt == "".join(r + "</s>" for r in (replies[-1:] if last_only else replies))


def test_template_that_rewrites_earlier_turns_is_refused_unless_last_only(tok):
    rewriting = tok.chat_template.replace("{{ m['content'] }}",
                                          "{{ '(earlier)' if m['role'] == 'assistant' and not loop.last "
                                          "else m['content'] }}")
    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.chat_template = rewriting
    messages = conversation(5, turns=2)
    with pytest.raises(PromptError, match=r"up to assistant turn 1 differently .* or assistant_loss: last"):
        assistant_labels(other, messages)
    ids, labels = assistant_labels(other, messages, last_only=True)
    assert other.decode([x for x in labels if x != -100]) == messages[-1]["content"] + "</s>"
    assert "(earlier)" in other.decode(ids)


def test_prepared_rows_mask_and_no_double_bos(tmp_path, tok, chat_llama_dir):
    rows = [{"messages": conversation(i)} for i in range(12)]
    prepared = prepare(chat_config(tmp_path, chat_llama_dir, rows, system_prompt=SYSTEM))
    assert prepared.manifest["model_type"] == "causal"  # from the base's config
    ds = prepared.load()
    for split in ("train", "test"):
        for row in ds[split]:
            assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"].count(tok.bos_token_id) == 1
            assert row["prompt"].startswith(f"<s><|system|>\n{SYSTEM}</s>\n")
            assert row["prompt"].endswith("<|assistant|>\n")
    row = ds["train"][0]
    i = next(k for k, r in enumerate(rows) if r["messages"][-1]["content"] == row["references"][0])
    messages = [{"role": "system", "content": SYSTEM}, *rows[i]["messages"]]
    assert (row["input_ids"], row["labels"]) == pieces_to_ids(tok, hand_rendered(messages, last_only=False))


def test_sharegpt_and_input_column_rows(tmp_path, tok, chat_llama_dir):
    share = [{"conversations": [{"from": "human", "value": f"hello alice {i}"},
                                {"from": "gpt", "value": "hi bob"}]} for i in range(8)]
    prepared = prepare(chat_config(tmp_path, chat_llama_dir, share, messages_column="conversations"))
    row = prepared.load()["train"][0]
    assert tok.decode([x for x in row["labels"] if x != -100]) == "hi bob</s>"
    plain = [{"dialogue": f"hello alice {i}", "summary": f"talk {i}"} for i in range(8)]
    cfg = chat_config(tmp_path, chat_llama_dir, plain, file="plain.jsonl", messages_column=None,
                      assistant_loss="last")
    row = prepare(cfg).load()["train"][0]
    assert row["prompt"].startswith("<s><|user|>\nhello alice ") and row["prompt"].endswith("<|assistant|>\n")
    assert tok.decode([x for x in row["labels"] if x != -100]) == row["references"][0] + "</s>"


def test_chat_template_is_part_of_the_fingerprint(tmp_path, tok, chat_llama_dir):
    rows = [{"messages": conversation(i)} for i in range(6)]
    first = prepare(chat_config(tmp_path, chat_llama_dir, rows))
    assert prepare(chat_config(tmp_path, chat_llama_dir, rows)).reused
    other_dir = tmp_path / "other_model"
    shutil.copytree(chat_llama_dir, other_dir)
    other = AutoTokenizer.from_pretrained(other_dir)
    other.chat_template = tok.chat_template.replace("<|", "[").replace("|>", "]")
    other.save_pretrained(other_dir)
    second = prepare(chat_config(tmp_path, other_dir, rows))
    assert not second.reused and second.fingerprint != first.fingerprint
    assert "\n[user]\n" in second.load()["train"][0]["prompt"]


# ---- truncation ----------------------------------------------------------------------------


def test_truncation_drops_oldest_turns_then_cuts_input_never_generation_prompt(tmp_path, tok, chat_llama_dir):
    long_user = "please book a table for two people tomorrow evening " * 12
    rows = [{"messages": conversation(i, turns=4)} for i in range(8)]
    rows += [{"messages": [{"role": "user", "content": long_user + str(i)},
                           {"role": "assistant", "content": "agreed " * 40 + str(i)}]} for i in range(4)]
    prepared = prepare(chat_config(tmp_path, chat_llama_dir, rows, system_prompt=SYSTEM, max_source_length=60,
                                   max_target_length=12, validation_size=1, test_size=1))
    settings = PromptSettings.from_manifest(prepared.manifest)
    cut = prepared.manifest["truncation"]["train"]
    assert cut["turns_dropped"]["rows"] >= 6 and cut["source"] >= 3 and cut["target"] >= 3
    assert "lost their oldest turns" in summary(prepared)
    for row in prepared.load()["train"]:
        n = prompt_length(row["labels"])
        assert n <= 60 and tok.decode(row["input_ids"][:n]) == row["prompt"]
        assert row["prompt"].startswith(f"<s><|system|>\n{SYSTEM}</s>\n<|user|>\n")
        assert row["prompt"].endswith("<|assistant|>\n")
        assert len(row["input_ids"]) - n <= 12 and tok.decode(row["input_ids"][-2:]) == "</s>\n"
    # Serving cuts a conversation the way the data stage did: same prompt for the same turns.
    context = rows[0]["messages"][:-1]
    (served,) = settings.render_conversations([context], tok)
    assert len(tok(served, add_special_tokens=False)["input_ids"]) <= 60
    assert served.endswith(f"<|user|>\n{context[-1]['content']}</s>\n<|assistant|>\n")
    assert context[0]["content"] not in served  # the oldest turns went first


# ---- errors before any work ------------------------------------------------------------------


@pytest.mark.parametrize("messages, match", [
    ([turn("assistant", "hi"), turn("user", "x")], r"row 0.*turn 0: role 'assistant' is out of order"),
    ([turn("user", " "), turn("assistant", "x")], r"turn 0 \(user\): content is empty"),
    ([turn("bot", "a")], r"turn 0: role 'bot' is unknown"),
    ([turn("user", "a")], r"its last turn is 'user'; it must be 'assistant'"),
    ([turn("user", "a"), turn("system", "s")], r"turn 1: role 'system' is out of order"),
])
def test_bad_conversations_are_one_line_errors(tmp_path, chat_llama_dir, messages, match):
    rows = [{"messages": messages}] + [{"messages": conversation(i)} for i in range(6)]
    with pytest.raises(PromptError, match=match) as e:
        prepare(chat_config(tmp_path, chat_llama_dir, rows))
    assert "\n" not in str(e.value) and "c.jsonl" in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("chat-*"))


def test_tokenizer_without_chat_template_is_refused_before_any_work(tmp_path, tiny_llama_dir):
    rows = [{"messages": conversation(i)} for i in range(6)]
    with pytest.raises(PromptError, match=r"has no chat template .*prompt format 'chat' needs one") as e:
        prepare(chat_config(tmp_path, tiny_llama_dir, rows))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="tokenizer='demo' has none"):
        prepare(DataConfig(prompt_format="chat", model_type="causal", output_root=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"\['system_prompt'\] only apply with prompt_format='chat'"):
        DataConfig(system_prompt="x")


def test_validate_messages_for_requests():
    validate_messages([turn("system", "s"), turn("user", "u")], "conversation 0")
    with pytest.raises(PromptError, match=r"^conversation 2, turn 1: role 'user' is out of order"):
        validate_messages([turn("user", "a"), turn("user", "b")], "conversation 2")


# ---- prompt settings: the manifest, the sidecar, rendering for evaluation and serving --------


def test_settings_render_and_encode_like_training(tmp_path, tok, chat_llama_dir):
    rows = [{"messages": conversation(i)} for i in range(10)]
    prepared = prepare(chat_config(tmp_path, chat_llama_dir, rows, system_prompt=SYSTEM))
    settings = PromptSettings.from_manifest(prepared.manifest)
    assert (settings.format, settings.system_prompt, settings.add_special_tokens) == ("chat", SYSTEM, False)
    assert PromptSettings.from_dict(settings.to_dict()) == settings  # the adapter sidecar round-trips it
    test_row = prepared.load()["test"][0]
    i = next(k for k, r in enumerate(rows) if r["messages"][-1]["content"] == test_row["references"][0])
    (rendered,) = settings.render_conversations([rows[i]["messages"][:-1]], tok)
    assert rendered == test_row["prompt"]
    (single,) = settings.render(["hello alice"], tok)
    assert single == f"<s><|system|>\n{SYSTEM}</s>\n<|user|>\nhello alice</s>\n<|assistant|>\n"
    own = [{"role": "system", "content": "other"}, {"role": "user", "content": "hi"}]
    assert settings.render_conversations([own], tok)[0].startswith("<s><|system|>\nother</s>")
    gen = GenerationConfig().with_settings(settings)
    assert gen.add_special_tokens is False
    ids = encode_prompts(tok, [rendered], None, False, add_special_tokens=gen.add_special_tokens)[0]
    assert ids == test_row["input_ids"][: prompt_length(test_row["labels"])]  # one BOS, as trained
    dm = PreparedDataModule(str(prepared.path), batch_size=2)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist() == ids


def test_template_format_takes_one_user_message():
    settings = PromptSettings(template="Summarize: {dialogue}\nSummary: ")
    assert settings.add_special_tokens is True
    convo = [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}]
    assert settings.render_conversations([convo]) == ["Summarize: hello\nSummary: "]
    with pytest.raises(PromptError, match="conversation 0 has 3 user/assistant turns; this task uses a plain "
                                          "prompt template: send one user message"):
        settings.render_conversations([conversation(1)[:3]])
    with pytest.raises(PromptError, match="pass the model's tokenizer"):
        PromptSettings(format="chat").render(["x"])


def test_generation_decodes_only_new_tokens(chat_llama_dir, tok):
    from lora_module import load_base_model

    model = load_base_model(str(chat_llama_dir))
    settings = PromptSettings(format="chat", max_source_length=64, model_type="causal")
    prompts = settings.render(["hello alice", "book a table"], tok)
    gen = GenerationConfig(batch_size=2, max_new_tokens=4, device="cpu").with_settings(settings)
    texts = generate(model, tok, prompts, gen)
    assert len(texts) == 2 and all("<|assistant|>" not in t and "hello alice" not in t for t in texts)


# ---- inspect ---------------------------------------------------------------------------------


def test_inspect_marks_trained_tokens(tmp_path, chat_llama_dir):
    rows = [{"messages": conversation(i)} for i in range(8)]
    prepared = prepare(chat_config(tmp_path, chat_llama_dir, rows))
    report = inspect_source(str(prepared.path), examples=1)
    assert "prompt_format chat" in report
    assert "<|assistant|>\n[[the price is" in report and "see you soon</s>]]\n<|user|>" in report
    file_report = inspect_source(str(tmp_path / "c.jsonl"), tokenizer=str(chat_llama_dir))
    assert "messages_column: messages" in file_report and "prompt_format: chat" in file_report
    assert "[[the price is 0 dollars see you soon</s>]]\n<|user|>" in file_report
