"""What a registered model ships and runs: the explicit code lists of the logged pyfunc models.

    .venv/bin/pytest tests/test_serving_code.py -q -s      # -s prints the lists

Each list must be closed under imports (`code_identity.import_closure`), must hold no registration
code (the served model never registers or runs the gate), and must actually run on its own: a
subprocess that sees only the copied files (not this checkout) loads an adapter and predicts the
same texts as this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from registry_helpers import make_adapter

from lora_module.adapter_io import write_prompt_settings
from lora_module.code_identity import import_closure
from lora_module.prompt import PromptSettings
from lora_module.serving.predictor import AdapterPredictor
from lora_module.serving.pyfunc import MULTI_TASK_CODE, SINGLE_TASK_CODE, copy_code

ROOT = Path(__file__).resolve().parents[1]
# Besides the LoRA core (lora_module/*.py, which grows with the variants it loads: DoRA, PiSSA, ...), a served
# model ships only these: generation, the serving room, and the registry's read side. Before serving left
# the registry it shipped 26 files, the registry CLI, gate and registration among them.
SERVED_BEYOND_CORE = {
    "lora_module/evaluation/__init__.py", "lora_module/evaluation/generation.py",
    "lora_module/registry/__init__.py", "lora_module/registry/bases.py", "lora_module/registry/retry.py",
    "lora_module/registry/store.py", "lora_module/registry/tracking.py",
    "lora_module/serving/__init__.py", "lora_module/serving/predictor.py", "lora_module/serving/pyfunc.py",
    "lora_module/serving/multitask.py",
}
PROMPT = PromptSettings("Summarize: {dialogue}\nSummary:", "dialogue", 24, 8, "seq2seq")
TEXTS = ["alice meets bob at the cafe", "the train leaves from platform four"]


def _relative(paths: list[Path]) -> set[str]:
    return {str(Path(p).resolve().relative_to(ROOT)) for p in paths}


@pytest.mark.parametrize(("files", "entry"), [
    (SINGLE_TASK_CODE, "lora_module.serving.pyfunc"),
    (MULTI_TASK_CODE, "lora_module.serving.multitask"),
])
def test_code_list_is_closed_short_and_free_of_registration(files, entry):
    print(f"\n{entry}: {len(files)} files\n  " + "\n  ".join(files))
    missing = _relative(import_closure([entry])) - set(files)
    assert missing == set(), f"imported but not shipped: {sorted(missing)}"
    assert len(set(files)) == len(files)
    assert {f for f in files if Path(f).parent != Path("lora_module")} <= SERVED_BEYOND_CORE
    assert all((ROOT / f).is_file() for f in files)
    registration = {"register", "gate", "aliases", "inputs", "version_lineage", "logged_model", "cli"}
    assert not [f for f in files if f.startswith("lora_module/registry/") and Path(f).stem in registration]
    assert not [f for f in files if f.startswith(("lora_module/training/", "data/", "flows/"))]


_RUN = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
sys.path[:] = [sys.argv[1]] + [p for p in sys.path
                               if p and ("site-packages" in p or not p.startswith(sys.argv[4]))]
import lora_module
assert lora_module.__file__.startswith(sys.argv[1]), lora_module.__file__
from lora_module.serving.predictor import AdapterPredictor
import lora_module.serving.{module}
texts = json.loads(sys.argv[3])
print(json.dumps(AdapterPredictor.from_adapter(sys.argv[2]).predict(texts, {{"max_new_tokens": 6}})))
"""


@pytest.mark.parametrize(("files", "module"), [(SINGLE_TASK_CODE, "pyfunc"), (MULTI_TASK_CODE, "multitask")])
def test_copied_code_runs_on_its_own(files, module, tiny_t5_dir, tmp_path):
    adapter, _ = make_adapter(tiny_t5_dir, tmp_path / "adapter", seed=5)
    write_prompt_settings(adapter, PROMPT)
    here = AdapterPredictor.from_adapter(adapter).predict(TEXTS, {"max_new_tokens": 6})
    code = copy_code(tmp_path / "code", files).parent
    cmd = [sys.executable, "-c", _RUN.format(module=module), str(code), str(adapter), json.dumps(TEXTS),
           str(ROOT)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
