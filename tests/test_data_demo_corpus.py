"""The demo corpus generator: deterministic, varied, and its summaries state only facts from the dialogue.

.venv/bin/pytest tests/test_data_demo_corpus.py -q
"""

from __future__ import annotations

import json
import re
from collections import Counter

from lora_pipeline.data import demo_corpus
from lora_pipeline.data.demo_corpus import DAYS, NAMES, SURNAMES, generate
from lora_pipeline.flows.cli import main as lora_pipeline

TIME = re.compile(r"\b\d{1,2}(?::\d{2})? [ap]m\b")


def test_same_seed_same_corpus_and_prefix_stable():
    a = generate(150, seed=3)
    assert a == generate(150, seed=3)
    assert generate(40, seed=3) == a[:40]  # each row has its own stream


def test_different_seeds_differ():
    a, b = generate(100, seed=0), generate(100, seed=1)
    same = sum(x == y for x, y in zip(a, b, strict=True))
    assert same == 0
    assert {r["dialogue"] for r in a}.isdisjoint({r["dialogue"] for r in b})


def test_rows_have_format_and_sizes():
    rows = generate(300, seed=0)
    for r in rows:
        assert set(r) == {"dialogue", "summary", "topic"}
        lines = r["dialogue"].split("\n")
        assert lines[0].startswith("#Person1#: ")
        assert all(line.startswith(("#Person1#: ", "#Person2#: ")) for line in lines)
        # speakers alternate, as in a conversation
        speakers = [line[:10] for line in lines]
        assert all(x != y for x, y in zip(speakers, speakers[1:], strict=False))
        assert 35 <= len(r["dialogue"].split()) <= 120
        assert 8 <= len(r["summary"].split()) <= 25
        assert 1 <= len(r["topic"].split()) <= 4
    assert len({r["dialogue"] for r in rows}) == len(rows)


def test_many_scenario_families_and_topics():
    assert len(demo_corpus.SCENARIOS) >= 6
    topics = Counter(r["topic"] for r in generate(600, seed=0))
    assert len(topics) >= 12
    assert max(topics.values()) < 0.2 * sum(topics.values())


def test_summary_facts_occur_in_dialogue():
    for r in generate(600, seed=7):
        dialogue, summary = r["dialogue"], r["summary"]
        times = TIME.findall(summary)
        people = [w for w in re.findall(r"[A-Z][a-z]+", summary) if w in NAMES or w in SURNAMES]
        assert people, summary  # every summary says who
        for fact in times + people + [d for d in DAYS if d in summary]:
            assert fact in dialogue, (fact, summary, dialogue)
        # stronger: every capitalised word (after the first) and every number is in the dialogue
        words = re.findall(r"[A-Za-z0-9]+", summary)
        for w in words[1:]:
            if w[0].isupper() or w[0].isdigit():
                assert w in dialogue, (w, summary, dialogue)


def test_summaries_need_the_dialogue():
    """Two dialogues of one family differ in their facts, so their summaries differ."""
    rows = generate(400, seed=0)
    by_topic: dict[str, set[str]] = {}
    for r in rows:
        by_topic.setdefault(r["topic"], set()).add(r["summary"])
    assert all(len(s) > 1 for t, s in by_topic.items() if sum(r["topic"] == t for r in rows) > 1)


def test_cli_writes_jsonl(tmp_path, capsys):
    assert lora_pipeline(["demo-corpus", "--out", str(tmp_path), "--n", "25", "--seed", "4"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "demo.jsonl").read_text().splitlines()]
    assert rows == generate(25, seed=4)
    assert "wrote 25 dialogues" in capsys.readouterr().out


def test_cli_bad_size_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert lora_pipeline(["demo-corpus", "--out", str(out), "--n", "-3"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: demo corpus size n must be an integer >= 0, got -3"]
    assert not out.exists()
