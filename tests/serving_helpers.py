"""Builders shared by the serving tests (not a test module): adapters with random weights on the tiny
models of conftest, saved as the pyfunc model the registry logs (a local folder, no registry), and
`lora-pipeline serve-model` run as a real process.

    folder = save_served_model(tmp / "model", adapter_dir)
    with ServeProcess(folder, tmp) as server:
        server.post("/invocations", {"dataframe_records": [{"text": "hi"}]})
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from mlflow_server import free_port

from lora_module import LoraConfig, LoraModel, contracts, load_base_model
from lora_module.adapter_io import write_prompt_settings
from lora_module.prompt import PromptSettings

T5_TARGETS, LLAMA_TARGETS = ["q", "v"], ["q_proj", "v_proj"]


def make_adapter(base_dir: Path, out: Path, seed: int, prompt: PromptSettings, targets: list[str]) -> Path:
    """A LoRA adapter (r=4) whose B is random (a visible effect), in PEFT format, `prompt` in its sidecar."""
    model = LoraModel(load_base_model(str(base_dir)), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    path = Path(model.save_pretrained(out, base_model_name_or_path=str(base_dir),
                                      metadata={"finetune": "lora", "data_fingerprint": "data-A"}))
    write_prompt_settings(path, prompt)
    return path


def mixed_task_predictor(base_dir: Path, adapters: dict[str, Path], prompts: dict[str, PromptSettings],
                         tokenizer: Any) -> Any:
    """A MultiTaskPredictor serving every task of `adapters` (task -> adapter folder)
    as version 1 on the base, each with its prompt settings."""
    from lora_module.serving.multitask import MultiTaskPredictor, TaskRef, TaskState

    model = LoraModel(load_base_model(str(base_dir)), None).eval()
    refs = [TaskRef.parse(task) for task in adapters]
    predictor = MultiTaskPredictor(model, tokenizer, refs, refresh_seconds=None)
    for task, adapter in adapters.items():
        model.load_adapter(adapter, f"{task}-v1")
        predictor.states[task] = TaskState(f"{task}-v1", "1", prompts[task], tokenizer)
    return predictor


def save_served_model(out: Path, adapter_dir: Path) -> Path:
    """The single-task pyfunc model the registry logs, saved to the folder `out` (servable by path)."""
    import mlflow.pyfunc

    from lora_module.serving.pyfunc import (
        SINGLE_TASK_CODE,
        SINGLE_TASK_ENTRY,
        copy_code,
        entry_code,
        model_signature,
        pip_requirements,
    )

    work = out.parent / f"{out.name}-src"
    work.mkdir(parents=True)
    entry = work / "lora_adapter_model.py"
    entry.write_text(entry_code(SINGLE_TASK_ENTRY))
    mlflow.pyfunc.save_model(
        str(out), python_model=str(entry), artifacts={contracts.ADAPTER_DIR: str(adapter_dir)},
        code_paths=[str(copy_code(work / "code", SINGLE_TASK_CODE))], signature=model_signature(),
        pip_requirements=pip_requirements(),
    )
    return out


class ServeProcess:
    """`lora-pipeline serve-model MODEL` in its own process group (extra args: `options`)."""

    def __init__(self, model: Path | str, cwd: Path, *options: str) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LORA_"))}
        env["LORA_PIPELINE_HOME"] = str(cwd / "home")
        exe = Path(sys.executable).parent / "lora-pipeline"
        cmd = [str(exe), "serve-model", str(model), "--port", str(self.port), *options]
        self.log = cwd / f"serve-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServeProcess:
        self.wait_ready()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()

    def wait_ready(self, timeout: float = 240) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def post(self, path: str, payload: Any, timeout: float = 120) -> tuple[int, dict]:
        data = json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body or b"{}")
            except ValueError:
                return e.code, {"message": body.decode(errors="replace")}

    def kill(self) -> None:
        """SIGKILL the whole process group (cleanup after a failed test)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members
