"""The promotion gate's rule and the registry's retry budget, as pure functions (no server): which
version is champion and challenger, what the gate decides, how version tags are read, which errors
are retried; and a registered model name refused before anything is written.

    .venv/bin/pytest tests/test_gate.py -q

The same code against a real `mlflow server` that is killed and restarted: tests/test_registry_faults.py.
"""

from __future__ import annotations

import inspect

import pytest
from mlflow_server import client_for
from registry_helpers import make_candidate

from lora_module.home import PipelineHome
from lora_module.registry.cli import main as cli_main
from lora_module.registry.gate import VersionScore, choose_aliases, choose_champion, decide_in_registry
from lora_module.registry.inputs import RegistrationInputError
from lora_module.registry.register import register_adapter
from lora_module.registry.retry import RetryPolicy, is_transient
from lora_module.registry.tracking import configure_tracking


# ---- the state-based gate and the retry budget (pure, fast) -------------------------------------
def _v(version: int, value: float | None, base: float | None = 0.1, fp: str | None = "A",
       demoted: tuple[str, ...] = ()) -> VersionScore:
    return VersionScore(str(version), value, base, fp, demoted)


def test_champion_is_the_best_eligible_version_on_the_newest_test_data():
    assert choose_champion([]) is None
    assert choose_champion([_v(1, 0.05), _v(2, None)]) is None  # below base / not evaluated
    assert choose_champion([_v(1, 0.5), _v(2, 0.3), _v(3, 0.4)]).version == "1"
    assert choose_champion([_v(1, 0.5), _v(2, 0.5)]).version == "2"  # a tie: the newer
    # Newest eligible version scored on test data B: only B versions compete, A is not comparable.
    assert choose_champion([_v(1, 0.9), _v(2, 0.3, fp="B"), _v(3, 0.4, fp="B")]).version == "3"
    assert choose_champion([_v(1, 0.9), _v(2, 0.3, fp="B"), _v(3, 0.4)]).version == "1"
    assert choose_champion([_v(1, 0.9), _v(2, 0.3, fp=None)]).version == "2"  # unknown data: alone
    # Demoted by hand from champion: never again by the gate; ineligible versions are skipped.
    assert choose_champion([_v(1, 0.5), _v(2, 0.9, demoted=("champion",)), _v(3, 0.01)]).version == "1"


def test_aliases_challenger_is_the_newest_other_version():
    assert choose_aliases([_v(1, 0.5), _v(2, 0.3), _v(3, 0.01)]) == {"champion": "1", "challenger": "3"}
    assert choose_aliases([_v(1, 0.5)]) == {"champion": "1", "challenger": None}
    assert choose_aliases([_v(1, 0.01), _v(2, 0.5, demoted=("challenger",))]) == {
        "champion": "2", "challenger": "1"}


def test_decision_agrees_with_the_registry_choice():
    cand = {"rougeL": 0.4, "data_fingerprint": "A"}
    base = {"rougeL": 0.1}
    # Sequential: v3 beats champion v1 on the same data.
    d = decide_in_registry([_v(1, 0.3), _v(2, 0.2), _v(3, 0.4)], "3", cand, base, "rougeL")
    assert d.promote and "champion v1" in d.reason
    d = decide_in_registry([_v(1, 0.3), _v(3, 0.4), _v(4, 0.6)], "3", cand, base, "rougeL")
    assert not d.promote and "below the current champion v4" in d.reason
    # v4, scored on new test data B, was registered by another machine meanwhile: compared with v4
    # alone v3 wins (not comparable), but v4 is the newest and decides which data counts.
    d = decide_in_registry([_v(1, 0.3), _v(3, 0.4), _v(4, 0.2, fp="B")], "3", cand, base, "rougeL")
    assert not d.promote and d.alias == "challenger" and "newest test data is v4 (rougeL 0.2000)" in d.reason


def test_version_score_reads_version_tags():
    tags = {"rouge.rougeL": "0.400000", "eval.baseline": "base", "rouge.base.rougeL": "0.125000",
            "eval_data_fingerprint": "fp", "manual.last": "demoted from champion: regression"}
    s = VersionScore.from_tags(7, tags, "rougeL")
    assert (s.version, s.value, s.base, s.data_fingerprint) == ("7", 0.4, 0.125, "fp")
    assert s.demoted_from == ("champion",)
    assert not s.eligible
    assert VersionScore.from_tags(1, {"eval_data_fingerprint": "unknown"}, "rougeL").data_fingerprint is None


def test_default_retry_budget_outlasts_a_30_second_restart():
    policy = RetryPolicy()
    assert policy.total_wait >= 45  # 1+2+4+8+10*6 = 75 s of waits, capped at 10 s each
    assert max(policy.wait(a) for a in range(policy.retries)) <= policy.max_backoff * 1.1
    params = inspect.signature(register_adapter).parameters  # the registration uses the same defaults
    assert (params["retries"].default, params["max_backoff"].default) == (policy.retries, policy.max_backoff)
    assert RetryPolicy(retries=2, backoff=0.5).total_wait == 1.5


def test_a_concurrent_write_conflict_is_retried_other_bad_requests_are_not():
    """Two machines setting one alias at once: the store's unique constraint rejects the second insert
    (seen in the race below on a sqlite-backed server); trying again converges. A real bad request fails."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

    conflict = ("(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.workspace, "
                "registered_model_aliases.name, registered_model_aliases.alias")
    assert is_transient(MlflowException(conflict, error_code=BAD_REQUEST))
    assert is_transient(MlflowException('duplicate key value violates unique constraint "aliases_pk"',
                                        error_code=BAD_REQUEST))
    assert not is_transient(MlflowException("Invalid alias name 'v1'", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(MlflowException("Registered Model with name=x not found",
                                            error_code=RESOURCE_DOES_NOT_EXIST))


def test_model_name_with_a_quote_is_refused_before_anything_exists(tiny_t5_dir, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = PipelineHome.from_env(tmp_path / "home")
    adapter, report, _ = make_candidate(tmp_path / "c", tiny_t5_dir, seed=3, lora_hits=4)
    with pytest.raises(RegistrationInputError, match=r"invalid registered model name \"o'brien\".*pattern"):
        register_adapter("demo", adapter, report, model_name="o'brien", retries=0, home=home)
    assert not (home.root / "mlflow.db").exists() and not home.root.exists()
    # A model left by an older version of the code (before names were checked) does not break `list`.
    uri = configure_tracking(home.tracking_uri)
    client_for(uri).create_registered_model("o'brien")
    register_adapter("demo", adapter, report, retries=0, home=home)
    capsys.readouterr()
    assert cli_main(["list", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "o'brien (task ?): 0 version(s)" in out and "demo-lora (task demo): 1 version(s)" in out
