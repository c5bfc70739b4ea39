"""An instruction mixture for the demo base: other tasks on the demo corpus's dialogues, FLAN-style.

    from lora_pipeline.data.demo_instructions import generate_instructions
    pairs = generate_instructions(2000, seed=1)
    # [("Who speaks first ...\n\n#Person1#: ...", "#Person1#"), ...]

FLAN-T5 is T5 tuned on a mixture of instruction tasks; that is why it already scores on DialogSum
before any fine-tuning. The demo base plays that role, so it gets the same treatment on a small
scale: each dialogue of the corpus (drawn with another seed than the demo tasks' rows) is paired
with an instruction and its answer, derived from the dialogue text alone. The demo's evaluation
tasks are never in the mixture: no reference summary and no topic label is ever a target. What
comes closest is the "key facts" task, a list of the names, days, times and amounts in the order
the dialogue mentions them: a gist, as FLAN's mixture holds other summarization data sets, but not
in the evaluation's sentence format. Every task has several phrasings, so the model learns to read
the instruction rather than one fixed prompt.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from lora_pipeline.data.config import DataConfigError
from lora_pipeline.data.demo_corpus import CITIES, DAYS, NAMES, NUMBERS, STREETS, generate

# A fact of the "key facts" gist: a name, "Dr. Surname", a day, a clock time, an amount, a count,
# a city, a street or a room number, found in the dialogue text as written.
_FACT = re.compile(
    r"\b(?:Dr\. [A-Z][a-z]+|" + "|".join(NAMES + DAYS + CITIES + STREETS) + r"|\d{1,2}(?::\d\d)? [ap]m"
    r"|\d+ dollars|room \d+|(?:" + "|".join(NUMBERS) + r") (?:nights|tickets))\b"
)
_TURN = re.compile(r"^#Person([12])#: (.*)$")
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen")


def _turns(dialogue: str) -> list[tuple[str, str]]:
    """(speaker tag, line) per turn, e.g. ("#Person1#", "Hello, ...")."""
    out = []
    for line in dialogue.split("\n"):
        m = _TURN.match(line)
        if m:
            out.append((f"#Person{m.group(1)}#", m.group(2)))
    return out


def key_facts(dialogue: str) -> str:
    """The dialogue's names, days, times, amounts and places, in order of first mention, joined by ", "."""
    seen: list[str] = []
    for m in _FACT.finditer(dialogue):
        if m.group(0) not in seen:
            seen.append(m.group(0))
    return ", ".join(seen) if seen else "none"


def _first_line(dialogue: str, speaker: str) -> str:
    return next((line for who, line in _turns(dialogue) if who == speaker), "nothing")


def _last_line(dialogue: str, speaker: str) -> str:
    lines = [line for who, line in _turns(dialogue) if who == speaker]
    return lines[-1] if lines else "nothing"


def _names(dialogue: str) -> str:
    found = [n for n in dict.fromkeys(re.findall(r"\b(?:Dr\. [A-Z][a-z]+|[A-Z][a-z]+)\b", dialogue))
             if n in NAMES or n.startswith("Dr. ")]
    return ", ".join(found) if found else "none"


def _days(dialogue: str) -> str:
    found = [d for d in dict.fromkeys(re.findall(r"\b[A-Z][a-z]+day\b", dialogue)) if d in DAYS]
    return " and ".join(found) if found else "none"


def _turn_count(dialogue: str) -> str:
    n = len(_turns(dialogue))
    return _COUNT_WORDS[n] if n < len(_COUNT_WORDS) else str(n)


def _who_first(dialogue: str) -> str:
    turns = _turns(dialogue)
    return turns[0][0] if turns else "nobody"


# task name -> (phrasings with {dialogue}, answer function of the dialogue)
TASKS: dict[str, tuple[tuple[str, ...], Callable[[str], str]]] = {
    "key_facts": (
        ("List the key facts of the following conversation.\n\n{dialogue}\n\nKey facts: ",
         "What are the main details in this conversation?\n\n{dialogue}\n\nDetails: ",
         "Note down the names, days, times and amounts in the following dialogue.\n\n{dialogue}\n\nNotes: "),
        key_facts),
    "first_line_p1": (
        ("What does #Person1# say first in the following conversation?\n\n{dialogue}\n\nAnswer: ",
         "Repeat the first thing #Person1# says.\n\n{dialogue}\n\n#Person1#: "),
        lambda d: _first_line(d, "#Person1#")),
    "first_line_p2": (
        ("What does #Person2# want in the following conversation? Quote their first line.\n\n{dialogue}"
         "\n\nAnswer: ",
         "Repeat the first thing #Person2# says.\n\n{dialogue}\n\n#Person2#: "),
        lambda d: _first_line(d, "#Person2#")),
    "last_line": (
        ("How does the following conversation end? Quote the last line of #Person1#.\n\n{dialogue}"
         "\n\nAnswer: ",
         "What is the last thing #Person1# says?\n\n{dialogue}\n\nAnswer: "),
        lambda d: _last_line(d, "#Person1#")),
    "names": (
        ("List the people named in the following conversation.\n\n{dialogue}\n\nNames: ",
         "Who is mentioned by name in this dialogue?\n\n{dialogue}\n\nAnswer: "),
        _names),
    "days": (
        ("Which days are mentioned in the following conversation?\n\n{dialogue}\n\nDays: ",
         "On which days of the week does this dialogue touch?\n\n{dialogue}\n\nAnswer: "),
        _days),
    "turns": (
        ("How many turns does the following conversation have?\n\n{dialogue}\n\nAnswer: ",
         "Count the lines of this dialogue.\n\n{dialogue}\n\nNumber of lines: "),
        _turn_count),
    "who_first": (
        ("Who speaks first in the following conversation?\n\n{dialogue}\n\nAnswer: ",
         "Which speaker opens this dialogue?\n\n{dialogue}\n\nSpeaker: "),
        _who_first),
}


def all_phrasings() -> list[str]:
    """Every instruction template with its `{dialogue}` removed (for training the tokenizer)."""
    return [p.replace("{dialogue}", "") for phrasings, _ in TASKS.values() for p in phrasings]


def generate_instructions(n: int, seed: int = 1, weights: dict[str, float] | None = None
                          ) -> list[tuple[str, str]]:
    """`n` (prompt, answer) pairs on the corpus rows of `seed`, one task drawn per row.

    `weights` (task name -> relative weight; default: key facts 3, every other task 1) sets the mix.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataConfigError(f"number of instruction pairs n must be an integer >= 0, got {n!r}")
    weights = weights or {name: 3.0 if name == "key_facts" else 1.0 for name in TASKS}
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise DataConfigError(f"unknown instruction task(s) {unknown}; valid: {sorted(TASKS)}")
    names = sorted(weights)
    rng = random.Random(f"instructions:{seed}")
    pairs = []
    for row in generate(n, seed):
        name = rng.choices(names, [weights[k] for k in names])[0]
        phrasings, answer = TASKS[name]
        pairs.append((rng.choice(phrasings).format(dialogue=row["dialogue"]), answer(row["dialogue"])))
    return pairs
