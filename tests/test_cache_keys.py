"""Cache keys come from the code that really runs: editing any file the stage imports changes its key.

    .venv/bin/pytest tests/test_cache_keys.py -q

The data fingerprint and the base-evaluation key hash the import closure of the code that produces
them (`lora_module.code_identity`). These tests copy the project's source tree to a temporary folder,
edit a copy of one file and compare the keys: in-process through `code_fingerprint(..., root=copy)`,
and end to end in a subprocess that imports the copy laid out as an installed wheel (no checkout on
its path) and computes the real data fingerprint and base-evaluation key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_module.code_identity import PACKAGE_DIRS, code_fingerprint, import_closure
from lora_module.evaluation.baseline import EVALUATION_CODE, code_identity
from lora_pipeline.data.prepare import DATA_CODE

ROOT = Path(__file__).resolve().parents[1]
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def _copy_repo_layout(dest: Path) -> Path:
    """The project's packages copied under `dest` as they lie in the repository (data/, flows/, ...)."""
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, dest / folder, ignore=_IGNORE)
    return dest


def _copy_installed_layout(dest: Path) -> Path:
    """The packages copied under `dest` as a wheel installs them (lora_pipeline/data, ...)."""
    for package, folder in PACKAGE_DIRS.items():
        shutil.copytree(ROOT / folder, dest.joinpath(*package.split(".")), ignore=_IGNORE)
    return dest


def _append(path: Path, line: str = "\n# edited\n") -> None:
    path.write_text(path.read_text() + line)


def _relative(paths: list[Path], root: Path) -> set[str]:
    return {p.resolve().relative_to(root.resolve()).as_posix() for p in paths}


def test_closure_follows_imports_into_the_project_only():
    data = _relative(import_closure(DATA_CODE), ROOT)
    # prepare -> encode -> lora_module.prompt (truncation); packages' __init__ run on the way
    assert {"data/prepare.py", "data/encode.py", "lora_module/prompt.py", "data/__init__.py",
            "lora_module/__init__.py"} <= data
    assert not [f for f in data if f.startswith(("lora_module/registry/", "lora_module/training/", "flows/"))]
    evaluation = _relative(import_closure(EVALUATION_CODE), ROOT)
    assert {"lora_module/evaluation/rouge.py", "lora_module/evaluation/generation.py",
            "lora_module/qlora.py", "data/prepare.py"} <= evaluation
    # generation's `from lora_module import LoraModel` goes through lora_module's lazy (PEP 562) table
    assert "lora_module/model.py" in evaluation


def test_closure_skips_type_checking_imports_and_takes_function_level_ones(tmp_path):
    root = tmp_path / "src"
    pkg = root / "lora_module"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "typed.py").write_text("")
    (pkg / "late.py").write_text("")
    (pkg / "runtime.py").write_text("")
    (pkg / "entry.py").write_text(
        "from typing import TYPE_CHECKING\nimport json\n"
        "if TYPE_CHECKING:\n    from lora_module import typed\nelse:\n    from lora_module import runtime\n"
        "def f():\n    from . import late\n    return late\n")
    closure = _relative(import_closure(["lora_module.entry"], root=root), root)
    assert closure == {"lora_module/__init__.py", "lora_module/entry.py", "lora_module/late.py",
                       "lora_module/runtime.py"}
    with pytest.raises(ValueError, match="not modules of the project"):
        import_closure(["json"], root=root)


def test_copy_has_the_same_keys_and_edits_change_only_the_keys_that_read_them(tmp_path):
    copy = _copy_repo_layout(tmp_path / "src")
    data_key, eval_key = code_fingerprint(DATA_CODE, root=copy), code_fingerprint(EVALUATION_CODE, root=copy)
    # Hashed by module path, not by where the files are: the copy has the keys this checkout has.
    assert (data_key, eval_key) == (code_fingerprint(DATA_CODE), code_identity())

    _append(copy / "lora_module" / "registry" / "cli.py")  # imported by neither stage
    assert code_fingerprint(DATA_CODE, root=copy) == data_key
    assert code_fingerprint(EVALUATION_CODE, root=copy) == eval_key

    _append(copy / "lora_module" / "evaluation" / "rouge.py")  # a metrics module: the eval key only
    assert code_fingerprint(DATA_CODE, root=copy) == data_key
    new_eval_key = code_fingerprint(EVALUATION_CODE, root=copy)
    assert new_eval_key != eval_key

    _append(copy / "lora_module" / "prompt.py")  # templating and truncation: both keys
    assert code_fingerprint(DATA_CODE, root=copy) != data_key
    assert code_fingerprint(EVALUATION_CODE, root=copy) not in {eval_key, new_eval_key}


_KEYS = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
sys.path.insert(0, sys.argv[1])
import lora_module, lora_pipeline.data
for m in (lora_module, lora_pipeline.data):
    assert m.__file__.startswith(sys.argv[1]), m.__file__
from lora_module.evaluation.baseline import evaluation_key
from lora_module.evaluation.generation import GenerationConfig
from lora_pipeline.data import DataConfig
from lora_pipeline.data.prepare import fingerprint
print(json.dumps([fingerprint(DataConfig(name="demo_summary"))[0],
                  evaluation_key("org/base-model", sys.argv[2], GenerationConfig(), limit=5)]))
"""


def _keys_in_subprocess(code_root: Path, prepared: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _KEYS, str(code_root), str(prepared)], capture_output=True,
                         text=True, timeout=300, cwd=code_root.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_editing_prompt_py_changes_the_real_data_fingerprint_and_eval_key(tmp_path):
    code = _copy_installed_layout(tmp_path / "site")
    prepared = tmp_path / "prepared"  # the smallest folder read_manifest accepts as complete
    (prepared / "dataset").mkdir(parents=True)
    (prepared / "tokenizer").mkdir()
    (prepared / "dataset" / "dataset_dict.json").write_text("{}")
    (prepared / "manifest.json").write_text(json.dumps({"complete": True, "fingerprint": "f" * 64}))

    before = _keys_in_subprocess(code, prepared)
    _append(code / "lora_module" / "prompt.py")
    after = _keys_in_subprocess(code, prepared)
    assert before[0] != after[0], "data fingerprint ignored an edit of lora_module/prompt.py"
    assert before[1] != after[1], "base-evaluation key ignored an edit of lora_module/prompt.py"
