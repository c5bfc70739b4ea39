"""The wheel: built from pyproject.toml, installed apart from the checkout, run from another directory.

Builds the wheel from a copy of the sources (so the checkout gets no build/ folder) with the commands
README "On a fresh machine" gives, as written plus what keeps them offline (`--no-build-isolation`:
setuptools from this venv; `--no-deps --target`: installed beside the venv's dependencies, torch's
CPU build among them), and runs the installed
`lora-pipeline` from a scratch directory with that folder first on PYTHONPATH: imports must come
from the installed copy, the shipped task specs and configs must be found inside the package, and a
tiny flow must run end to end (prepare, evaluate, train in a subprocess, evaluate, register).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "lora_module", "data", "flows", "deploy", "benchmarks")


CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def readme_install_lines() -> tuple[list[str], list[str], list[str]]:
    """The `pip` lines of README "On a fresh machine": build the wheel, CPU torch, install the wheel."""
    text = (REPO / "README.md").read_text()
    start = text.index("\n## On a fresh machine\n")
    section = text[start:text.index("\n## ", start + 1)]
    lines = [shlex.split(line, comments=True) for block in re.findall(r"```bash\n(.*?)```", section, re.S)
             for line in block.splitlines()]
    build, torch, install = [words for words in lines if words[:1] == ["pip"]]
    return build, torch, install


def test_readme_install_lines_build_then_cpu_torch_then_the_wheel():
    build, torch, install = readme_install_lines()
    assert build[:2] == ["pip", "wheel"] and "--no-deps" in build and build[-1] == "."
    assert torch == ["pip", "install", "--index-url", CPU_INDEX, "torch"]  # before the wheel pulls CUDA's
    assert install[:2] == ["pip", "install"] and install[2].endswith(".whl")


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> str:
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    tail = f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{tail}"
    return res.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel, the folder it is installed into, a scratch working directory and its environment."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "out"))
        else:
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LORA_PIPELINE_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build, _, install = readme_install_lines()  # run in the source folder, as the README says
    _run([*pip, *build[1:], "--no-build-isolation"], env, src)
    wheel = src / install[2]
    assert list((src / "dist").glob("*.whl")) == [wheel], "the README names another wheel than pip writes"
    site = root / "site"
    _run([*pip, *install[1:], "--no-deps", "--target", str(site)], env, src)
    work = root / "work"
    work.mkdir()
    env.update(PYTHONPATH=str(site), PREFECT_HOME=str(root / "prefect"), HF_HUB_OFFLINE="1",
               DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1",
               # Prefect's temporary server can take over its 20 s default to start on a busy machine.
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    script = str(site / "bin" / "lora-pipeline")
    return {"wheel": wheel, "site": site, "work": work, "env": env, "script": script}


def test_wheel_has_namespaced_packages_and_ships_deploy_files(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"lora_module", "lora_pipeline"}  # no top-level data/, flows/, benchmarks/, deploy/
    for shipped in ("prefect.yaml", "tasks/summary.yaml", "tasks/topic.yaml",
                    "configs/data_demo_summary.yaml", "configs/demo_summary_lora.yaml"):
        assert f"lora_pipeline/deploy/{shipped}" in names
    assert "lora_pipeline/flows/cli.py" in names and "lora_module/training/__main__.py" in names


def test_installed_modules_come_from_the_install_not_the_checkout(installed):
    probe = ("import json, lora_module, lora_pipeline.data, lora_pipeline.flows.pipeline;"
             "import lora_pipeline.deploy as d;"
             "from lora_pipeline.flows.specs import load_task_spec;"
             "print(json.dumps([lora_module.__file__, lora_pipeline.data.__file__,"
             " lora_pipeline.flows.pipeline.__file__, load_task_spec('summary').lora_config,"
             " str(d.PREFECT_YAML)]))")
    out = _run([sys.executable, "-c", probe], installed["env"], installed["work"])
    paths = json.loads(out.strip().splitlines()[-1])
    site = installed["site"].resolve()
    for p in paths:
        assert Path(p).resolve().is_relative_to(site), f"{p} is not under {site}"


def test_installed_console_script_prepares_and_runs_a_tiny_flow(installed, tiny_t5_dir):
    env, work, script = installed["env"], installed["work"], installed["script"]
    out = _run([script, "prepare", "--config", "deploy/configs/data_demo_summary.yaml", "--name", "tiny",
                "--demo_train_size", "120", "--demo_validation_size", "8", "--demo_test_size", "8",
                "--output_root", str(work / "prepared")], env, work)
    assert "prepared tiny -> " in out and "rows: train=120  validation=8  test=8" in out

    # A spec outside the package whose configs are named as in the shipped specs (`deploy/configs/...`).
    spec = work / "tiny_summary.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tiny_summary",
        "data_config": "deploy/configs/data_demo_summary.yaml",
        "lora_config": "deploy/configs/demo_summary_lora.yaml",
        "base_model": str(tiny_t5_dir),
        "generation": {"batch_size": 8, "max_new_tokens": 4},
        "data_overrides": {"demo_train_size": 40, "demo_validation_size": 8, "demo_test_size": 8,
                           "max_source_length": 128},
        "train_overrides": ["--trainer.max_steps", "2", "--data.batch_size", "8",
                            "--trainer.enable_progress_bar", "false"],
    }))
    out = _run([script, "run", "--task", str(spec), "--home", str(work / "home"), "--no-full"], env, work,
               timeout=600)
    summary = json.loads(out[re.search(r"^\{$", out, re.M).start():])  # the summary printed last
    result = summary["results"]["tiny_summary"]
    assert summary["failed"] == {} and result["version"] == "1"
    assert (work / "home" / "mlflow.db").is_file()
