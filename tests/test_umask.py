"""Files the pipeline writes honour the user's umask (#27): 0600 under umask 077, 0644 under 022.

`lora_module.files` used to chmod every atomic write to 0644, so `predictions.csv` (it holds the
input dialogues) was world-readable whatever the umask. Each case runs in a fresh interpreter so
the umask is the one in force when `lora_module.files` is imported, as for a real command.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Real evaluation and report writers (predictions.csv, report.json, ...) plus the atomic helpers.
_WRITE = """
import os, sys
os.umask(int(sys.argv[2], 8))
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from lora_module.evaluation.evaluate import evaluate_predictions
from lora_module.evaluation.report import build_report
from lora_module.files import write_atomic, write_json_atomic
out = Path(sys.argv[1])
refs = ["alice meets bob at nine.", "the train leaves at four."]
data = {"fingerprint": "data-A", "name": "demo"}
evals = [evaluate_predictions(name, refs, refs, out / "eval", prompts=["a", "b"], kind=name, data=data,
                              n_resamples=5) for name in ("base", "lora")]
build_report("demo", evals, out / "report", n_resamples=5)
write_atomic(out / "plain.txt", "x")
write_json_atomic(out / "metrics.json", {"x": 1})
"""


def _modes_after_writing(tmp_path: Path, umask: str) -> dict[str, int]:
    subprocess.run([sys.executable, "-c", _WRITE, str(tmp_path), umask, str(TESTS)], check=True,
                   capture_output=True, text=True, timeout=300)
    return {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
            for p in tmp_path.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("umask", "mode"), [("077", 0o600), ("022", 0o644)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    modes = _modes_after_writing(tmp_path, umask)
    names = {Path(p).name for p in modes}
    assert {"predictions.csv", "report.json", "metrics.json", "plain.txt"} <= names, names
    assert set(modes.values()) == {mode}, {p: oct(m) for p, m in modes.items()}
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"x": 1}


def test_reading_the_umask_leaves_it_unchanged():
    code = ("import os; os.umask(0o027); import lora_module.files as f; m = os.umask(0); "
            "print(oct(f.FILE_MODE), oct(m))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["0o640", "0o27"]
