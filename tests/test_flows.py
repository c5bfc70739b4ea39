"""The Prefect flows on the tiny T5, under prefect_test_harness with the embedded SQLite MLflow.

Two runs of the many-task flow share one pipeline home:
1. `tiny_summary` + `tiny_topic`: each registers version 1; per-task and summary artifacts exist.
2. `tiny_summary` again, with the registry down for its first registration attempt (retried, then
   version 2), the prepared data and base evaluation reused from the home's content-addressed
   folders (nothing prepared or generated again), next to a `tiny_topic` whose training fails for
   good: the summary task still registers, and topic's version 1 from run 1 is left intact.
Each task's training and registration runs share one MLflow experiment, `lora-<task>`.
Parameter checks run without any training.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from lora_pipeline.flows.pipeline import load_specs, many_tasks
from lora_pipeline.flows.specs import TaskSpecError, check_task_spec, known_tasks, load_task_spec

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"
TRAIN = ["--trainer.max_steps", "2", "--data.batch_size", "8", "--trainer.enable_progress_bar", "false",
         "--trainer.log_every_n_steps", "1"]
DATA = {"demo_train_size": 40, "demo_validation_size": 8, "demo_test_size": 8, "max_source_length": 128}


def write_spec(folder: Path, name: str, demo_task: str, base: Path, full: bool = True, **extra) -> Path:
    """A task spec on the tiny model with a few dozen rows and two training steps."""
    spec = {
        "name": name,
        "data_config": str(CONFIGS / f"data_demo_{demo_task}.yaml"),
        "lora_config": str(CONFIGS / f"demo_{demo_task}_lora.yaml"),
        "full_config": str(CONFIGS / f"demo_{demo_task}_full.yaml") if full else None,
        "base_model": str(base),
        "generation": {"batch_size": 8, "max_new_tokens": 8, "max_source_length": 128},
        "data_overrides": DATA,
        "train_overrides": TRAIN,
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def read_artifacts(key: str) -> list:
    """Artifacts with this key, newest first (several runs publish under one key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def go():
        async with get_client() as client:
            keys = ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            return await client.read_artifacts(artifact_filter=keys, sort=ArtifactSort.CREATED_DESC)

    return asyncio.run(go())


# ---- specs and parameter checks (no training) ---------------------------------------------------
def test_shipped_specs_load_and_check():
    assert {"summary", "topic", "dialogsum"} <= set(known_tasks())
    for name in ("summary", "topic"):
        spec = load_task_spec(name)
        assert Path(spec.data_config).is_file() and Path(spec.lora_config).is_file()
        assert spec.base_model == "demo" and spec.model_name == f"{name}-lora"
        assert check_task_spec(spec) == []


def test_invalid_parameters_fail_before_training(tmp_path, tiny_t5_dir, monkeypatch):
    import lora_module.training.launcher
    from lora_pipeline import data

    def forbidden(*a, **k):
        raise AssertionError("nothing may be prepared or trained when the parameters are invalid")

    monkeypatch.setattr(data, "prepare", forbidden)
    monkeypatch.setattr(lora_module.training.launcher, "run_fit", forbidden)
    good = write_spec(tmp_path, "good", "summary", tiny_t5_dir)

    with pytest.raises(TaskSpecError, match=r"unknown task 'nope'; known tasks are \[.*summary"):
        load_specs(["nope"], None, None, None, None, None)
    missing = write_spec(tmp_path, "missing", "summary", tiny_t5_dir)
    missing.write_text(missing.read_text().replace("demo_summary_lora.yaml", "no_such.yaml"))
    with pytest.raises(TaskSpecError, match="lora_config: file .*no_such.yaml' not found"):
        load_specs([str(missing)], None, None, None, None, None)
    with pytest.raises(TaskSpecError, match="demo_train_size must be an integer >= 1, got -5"):
        load_specs([str(good)], None, {"demo_train_size": -5}, None, None, None)
    with pytest.raises(TaskSpecError, match="lora_config .* does not parse"):
        load_specs([str(good)], None, None, ["--model.lora.r", "0"], None, None)
    with pytest.raises(TaskSpecError, match="unknown task spec keys \\['colour'\\]"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(good.read_text() + "colour: red\n")
        load_specs([str(bad)], None, None, None, None, None)
    # Every problem of every task is reported at once.
    with pytest.raises(TaskSpecError) as err:
        load_specs([str(good), "nope"], None, None, None, 0, None)
    assert "eval_limit must be an integer >= 1" in str(err.value) and "unknown task 'nope'" in str(err.value)


def test_flow_rejects_bad_parameters_before_training(harness, tmp_path, monkeypatch):
    import lora_module.training.launcher

    monkeypatch.setattr(lora_module.training.launcher, "run_fit",
                        lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(TaskSpecError, match="unknown task 'nope'"):
        many_tasks(tasks=["summary", "nope"], home=str(tmp_path))
    with pytest.raises(TaskSpecError, match="max_concurrency"):
        many_tasks(tasks=["summary"], home=str(tmp_path), max_concurrency=0)


# ---- the flows end to end on the tiny model -----------------------------------------------------
@pytest.mark.slow
def test_many_tasks_register_cache_and_survive_faults(harness, tmp_path, tiny_t5_dir, monkeypatch):
    from mlflow import MlflowClient

    import lora_module.evaluation.evaluate as evaluation
    import lora_module.registry as registry
    import lora_pipeline.flows.tasks as flow_tasks
    from lora_pipeline import data

    home = tmp_path / "home"
    specs = {
        "summary": write_spec(tmp_path, "tiny_summary", "summary", tiny_t5_dir),
        "topic": write_spec(tmp_path, "tiny_topic", "topic", tiny_t5_dir, full=False),
    }

    # Run 1: both tasks register version 1 and publish their artifacts.
    first = many_tasks(tasks=[str(specs["summary"]), str(specs["topic"])], home=str(home))
    assert first["failed"] == {}
    for name in ("tiny_summary", "tiny_topic"):
        r = first["results"][name]
        assert r["version"] == "1" and r["model_name"] == f"{name}-lora"
        assert r["cached"] == {"prepare": False, "evaluate_base": False}
        assert set(r["rouge"]) == ({"base", "full", "lora"} if name == "tiny_summary" else {"base", "lora"})
        assert Path(r["report"]).is_file()
        art = read_artifacts(f"rouge-{name.replace('_', '-')}")
        assert art and "ROUGE" in art[0].data and f"{name}-lora v1" in art[0].data
        assert r["run_id"] in art[0].data
    assert read_artifacts("lora-tasks-summary")
    store = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    topic_v1 = client.get_model_version("tiny_topic-lora", "1")
    assert topic_v1.tags["task"] == "tiny_topic"
    # One experiment per task holds its training runs (full and LoRA) and its registration run.
    for name, n_runs in (("tiny_summary", 3), ("tiny_topic", 2)):
        experiment = client.get_experiment_by_name(f"lora-{name}").experiment_id
        training_run = client.get_model_version(f"{name}-lora", "1").tags["training_run_id"]
        assert client.get_run(first["results"][name]["run_id"]).info.experiment_id == experiment
        assert client.get_run(training_run).info.experiment_id == experiment
        assert len(client.search_runs([experiment])) == n_runs
    assert client.get_experiment_by_name("lora_pipeline") is None

    # Run 2: reused preparation and base evaluation, a registry outage retried, and a task that
    # fails for good.
    real_prepare, real_evaluate = data.prepare, evaluation.evaluate_model
    reused, generated = [], []

    def spy_prepare(config):
        res = real_prepare(config)
        reused.append(res.reused)
        return res

    def spy_evaluate(spec, *a, **k):
        generated.append(spec.kind)
        return real_evaluate(spec, *a, **k)

    monkeypatch.setattr(data, "prepare", spy_prepare)
    monkeypatch.setattr(evaluation, "evaluate_model", spy_evaluate)
    real_register = registry.register_adapter
    attempts = []

    def flaky_register(task, *a, **k):
        attempts.append(task)
        if attempts.count(task) == 1:
            raise registry.RegistryUnavailableError(f"MLflow registry at {k.get('tracking_uri')} unreachable")
        return real_register(task, *a, **k)

    monkeypatch.setattr(registry, "register_adapter", flaky_register)
    # The broken training fails the same way on a retry: skip the retry (and its minute of start-up).
    monkeypatch.setattr(flow_tasks, "train", flow_tasks.train.with_options(retries=0))
    # Same task name, but its LoRA targets match no module: training fails in the subprocess.
    (tmp_path / "broken").mkdir()
    broken = write_spec(tmp_path / "broken", "tiny_topic", "topic", tiny_t5_dir, full=False,
                        train_overrides=[*TRAIN, "--model.lora.target_modules", "[no_such_module]"])
    second = many_tasks(tasks=[str(specs["summary"]), str(broken)], home=str(home), train_full=False,
                        allow_partial=True)

    assert list(second["failed"]) == ["tiny_topic"]
    assert "training failed" in second["failed"]["tiny_topic"]
    r = second["results"]["tiny_summary"]
    assert r["version"] == "2" and set(r["rouge"]) == {"base", "lora"}
    assert r["cached"] == {"prepare": True, "evaluate_base": True}
    # Both tasks' data and base evaluations were made in run 1; only the new adapter is evaluated.
    assert reused == [True, True] and generated == ["lora"]
    assert attempts == ["tiny_summary", "tiny_summary"]  # one outage, one retry that went through
    assert r["rouge"]["base"] == first["results"]["tiny_summary"]["rouge"]["base"]  # the cached evaluation
    # The failed topic run registered nothing and left version 1 (and its alias) as it was.
    versions = client.search_model_versions("name='tiny_topic-lora'")
    assert [str(v.version) for v in versions] == ["1"]
    assert client.get_model_version("tiny_topic-lora", "1").aliases == topic_v1.aliases
    assert "FAILED" in read_artifacts("lora-tasks-summary")[0].data


def test_demo_printout_marks_reused_stages(tmp_path):
    """The demo's `c` marks come from the library's `reused` flags (the flow result's `cached`)."""
    from lora_module.home import PipelineHome
    from lora_pipeline.flows.demo import render

    rows = {"base": {"rouge1": 0.1, "rouge2": 0.05, "rougeL": 0.1, "rougeLsum": 0.1, "trainable": None}}
    result = {"rouge_n": 4, "rouge": rows, "model_name": "t-lora", "version": "2", "alias": "champion",
              "decision": "better", "report_md": "report.md",
              "timings": {"prepare": 0.2, "evaluate_base": 3.0},
              "cached": {"prepare": True, "evaluate_base": False}}
    summary = {"results": {"t": result}, "failed": {}, "seconds": 5.0, "base_seconds": 0.1,
               "validate_seconds": 0.1}
    home = PipelineHome(tmp_path, "http://127.0.0.1:5000")
    lines = render(summary, 9.0, 6.0, home).splitlines()
    assert next(line for line in lines if line.strip().startswith("prepare")).split()[-1] == "0.2c"
    assert next(line for line in lines if line.strip().startswith("evaluate_base")).split()[-1] == "3.0"
    assert any("http://127.0.0.1:5000" in line for line in lines)  # the home's store, no guessed SQLite
