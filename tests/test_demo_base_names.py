"""`base_model: demo-causal` in a task spec (deploy/tasks/chat_summary.yaml) builds the causal demo base,
whichever demo settings the flow passes; "demo" builds what the settings say. Logic only: the build
itself is replaced by a recorder (tests/test_causal_demo.py builds real bases)."""

from __future__ import annotations

import pytest

from lora_module.training import demo_base
from lora_pipeline.flows import tasks
from lora_pipeline.flows.specs import DEMO_BASES, check_task_spec, load_task_spec


@pytest.fixture
def builds(monkeypatch, tmp_path):
    seen = []

    def record(out, **settings):
        seen.append(settings)
        return tmp_path / "base"

    monkeypatch.setattr(demo_base, "build_demo_base", record)
    return seen


@pytest.mark.parametrize(("base", "given", "expected"), [
    ("demo", None, {}),
    ("demo", {"family": "causal", "corpus_size": 50}, {"family": "causal", "corpus_size": 50}),
    ("demo-causal", None, {"family": "causal"}),
    ("demo-causal", {"corpus_size": 50}, {"family": "causal"}),  # T5 settings: the causal defaults
    ("demo-causal", {"family": "causal", "steps": 3}, {"family": "causal", "steps": 3}),
])
def test_demo_base_names_pick_their_family(builds, tmp_path, base, given, expected):
    out = tasks.build_base.fn(base, str(tmp_path), given)
    assert out["built"] and builds == [expected]


def test_other_bases_pass_through_and_the_chat_spec_names_the_causal_base(builds, tmp_path):
    passed = tasks.build_base.fn("/models/x", str(tmp_path))
    assert passed == {"path": "/models/x", "built": False, "seconds": 0.0}
    assert builds == []
    spec = load_task_spec("chat_summary")
    assert DEMO_BASES[spec.base_model] == "causal"
    assert check_task_spec(spec) == []  # "demo-causal" is not looked up as a Hub id or folder


@pytest.mark.parametrize(("config", "field", "value"), [
    ("DemoBaseConfig", "lr", float("nan")), ("DemoBaseConfig", "lr", float("inf")),
    ("DemoBaseConfig", "mean_span", float("nan")), ("CausalDemoConfig", "lr", float("inf")),
])
def test_demo_base_settings_refuse_nan_and_inf(config, field, value):
    from lora_module.errors import SettingsError
    from lora_module.training import demo_causal

    cls = getattr(demo_base, config, None) or getattr(demo_causal, config)
    with pytest.raises(SettingsError, match=f"{config}.{field} must be a finite number > 0"):
        cls(**{field: value})
