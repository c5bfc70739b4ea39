"""The registry under faults: a real `mlflow server` killed at three points of a registration, and
two machines (two pipeline homes) racing to register into one server.

    .venv/bin/pytest tests/test_registry_faults.py -q              # about 2 minutes

The gate's rule and the retry budget as pure functions: tests/test_gate.py. The server is the
session's restartable `mlflow server` (tests/conftest.py); the Prefect limit is held by the
session's Prefect server.

Kill points (the server's process group gets SIGKILL from a hook at that moment, then comes back
on the same SQLite store and port): right after the version is created, during the logged model's
upload, and between two alias writes. Whatever the point, the end state is one version for the
adapter, complete tags, the gate's aliases, its run FINISHED (an abandoned attempt's run FAILED)
and no logged model left PENDING. The race: in each of 20 rounds two threads, each with its own
pipeline home (so no shared file lock: only the registry itself is shared), register candidates
with different scores at once; after each round the champion is the best eligible version.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from mlflow_server import MlflowServer, client_for
from registry_helpers import make_candidate, weights_sha

import lora_module.registry.register as register_module
from lora_module.home import PipelineHome
from lora_module.registry.aliases import LIMIT_PREFIX, registration_lock
from lora_module.registry.register import register_adapter
from lora_module.registry.retry import RegistryUnavailableError, RetryPolicy

GATE_TAGS = ("gate.decision", "gate.reason")  # the full decision is in the run's lineage.json
LINEAGE_TAGS = ("task", "adapter_sha256", "training_run_id", "rouge.rougeL", "eval_data_fingerprint")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# ---- a real server, killed ----------------------------------------------------------------------
@pytest.fixture
def server(restartable_mlflow_server) -> MlflowServer:
    return restartable_mlflow_server


def _home(server: MlflowServer, name: str) -> PipelineHome:
    return PipelineHome.from_env(server.root.parent / name, server.uri)


def _check_end_state(server: MlflowServer, model: str, adapter_sha: str, champion: str) -> tuple[str, list]:
    """Exactly one complete version for the adapter, the expected champion, every run of the
    experiment FINISHED or FAILED, no logged model PENDING. Returns (version, runs)."""
    client = client_for(server.uri)
    mine = [mv for mv in client.search_model_versions(f"name='{model}'")
            if mv.tags.get("adapter_sha256") == adapter_sha]
    assert len(mine) == 1, f"{len(mine)} versions of {model} for one adapter"
    mv = mine[0]
    missing = [t for t in (*LINEAGE_TAGS, *GATE_TAGS) if t not in mv.tags]
    assert not missing, f"{model} v{mv.version} lacks tags {missing}"
    assert mv.tags["gate.decision"] in ("promoted", "not_promoted")  # no longer "pending"
    assert str(client.get_registered_model(model).aliases["champion"]) == champion
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["registered_version"] == f"{model}/{mv.version}"
    exp = run.info.experiment_id
    runs = client.search_runs([exp], f"tags.adapter_sha256 = '{adapter_sha}'")
    assert {r.info.status for r in runs} <= {"FINISHED", "FAILED"}
    models = client.search_logged_models([exp])
    pending = [m.model_id for m in models if m.status == LoggedModelStatus.PENDING]
    assert not pending, f"logged models left PENDING: {pending}"
    return str(mv.version), runs


def _kill_once(server: MlflowServer, then=None):
    """A hook body: kill the server the first time it is reached (and start `then` in a thread)."""
    fired = threading.Event()

    def fire() -> None:
        if fired.is_set():
            return
        fired.set()
        server.kill()
        if then is not None:
            threading.Thread(target=then, daemon=True).start()

    return fire, fired


def test_kill_after_version_created_then_rerun_completes_it(server, tiny_t5_dir, tmp_path, monkeypatch):
    adapter, report, _ = make_candidate(tmp_path / "c", tiny_t5_dir, seed=11, lora_hits=5)
    home = _home(server, "home-a")
    fire, fired = _kill_once(server)
    real = register_module._create_version

    def create_then_kill(*args, **kwargs):
        version = real(*args, **kwargs)
        fire()
        return version

    monkeypatch.setattr(register_module, "_create_version", create_then_kill)
    with pytest.raises(RegistryUnavailableError, match="re-run the registration"):
        register_adapter("killa", adapter, report, retries=1, backoff=0.1, home=home)
    assert fired.is_set()
    monkeypatch.setattr(register_module, "_create_version", real)
    server.start()
    res = register_adapter("killa", adapter, report, retries=2, backoff=0.5, home=home)
    assert res.resumed and (res.version, res.alias) == ("1", "champion")
    version, runs = _check_end_state(server, "killa-lora", weights_sha(adapter), "1")
    assert version == "1" and [r.info.status for r in runs] == ["FINISHED"]  # the same run, completed


def test_kill_during_model_upload_then_rerun_starts_over_cleanly(server, tiny_t5_dir, tmp_path, monkeypatch):
    adapter, report, _ = make_candidate(tmp_path / "c", tiny_t5_dir, seed=12, lora_hits=5)
    home = _home(server, "home-a")
    fire, fired = _kill_once(server)
    real_files, real_file = HttpArtifactRepository.log_artifacts, HttpArtifactRepository.log_artifact
    uploading = threading.local()

    def log_artifacts(self, local_dir, artifact_path=None):  # the logged model's folder
        uploading.count = 0
        try:
            return real_files(self, local_dir, artifact_path)
        finally:
            uploading.count = None

    def log_artifact(self, local_file, artifact_path=None):
        if getattr(uploading, "count", None) is not None:
            uploading.count += 1
            if uploading.count == 3:  # two files are up, the rest of the model is not
                fire()
        return real_file(self, local_file, artifact_path)

    monkeypatch.setattr(HttpArtifactRepository, "log_artifacts", log_artifacts)
    monkeypatch.setattr(HttpArtifactRepository, "log_artifact", log_artifact)
    with pytest.raises(RegistryUnavailableError):
        register_adapter("killb", adapter, report, retries=1, backoff=0.1, home=home)
    assert fired.is_set()
    server.start()
    client = client_for(server.uri)
    exp = client.get_experiment_by_name("lora-killb").experiment_id
    assert any(m.status == LoggedModelStatus.PENDING for m in client.search_logged_models([exp]))
    res = register_adapter("killb", adapter, report, retries=2, backoff=0.5, home=home)
    assert not res.resumed and res.version == "1"
    _, runs = _check_end_state(server, "killb-lora", weights_sha(adapter), "1")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]  # the broken attempt FAILED
    models = client.search_logged_models([exp])
    assert sorted(str(m.status) for m in models) == sorted(map(str, [LoggedModelStatus.FAILED,
                                                                     LoggedModelStatus.READY]))


def test_kill_between_alias_writes_default_retries_outlast_a_30s_outage(server, tiny_t5_dir, tmp_path,
                                                                         monkeypatch):
    home = _home(server, "home-a")
    a1, r1, _ = make_candidate(tmp_path / "c1", tiny_t5_dir, seed=13, lora_hits=3)
    a2, r2, _ = make_candidate(tmp_path / "c2", tiny_t5_dir, seed=14, lora_hits=6)
    assert register_adapter("killc", a1, r1, retries=2, backoff=0.5, home=home).alias == "champion"
    outage = {}

    def restart_after_30s() -> None:  # down for 30 s, then its usual start-up
        time.sleep(30.0)
        server.start()
        outage["seconds"] = time.monotonic() - outage["killed"]

    fire, fired = _kill_once(server, then=restart_after_30s)
    real = MlflowClient.set_registered_model_alias

    def set_alias_then_kill(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        outage.setdefault("killed", time.monotonic())
        fire()
        return out

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_alias_then_kill)
    res = register_adapter("killc", a2, r2, home=home)  # the default retry policy
    assert fired.is_set() and outage["seconds"] >= 30, outage
    assert (res.version, res.alias, res.resumed) == ("2", "champion", False)
    _check_end_state(server, "killc-lora", weights_sha(a2), "2")
    aliases = client_for(server.uri).get_registered_model("killc-lora").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "2", "challenger": "1"}
    print(f"outage {outage['seconds']:.1f} s survived with the default retries "
          f"({RetryPolicy().total_wait:.0f} s budget)")


# ---- two machines, one registry ---------------------------------------------------------------------
ROUNDS = 20


def _rounds() -> list[tuple[str, int, int]]:
    """(test data fingerprint, hits of machine A, hits of machine B) per round: the test data
    changes every 4 rounds, so some rounds must keep an older champion and some must replace it."""
    import random

    rng = random.Random(7)
    return [(f"data-{r // 4}", *rng.sample(range(2, 9), 2)) for r in range(ROUNDS)]


def _expected_champion(history: list[tuple[str, str, int]]) -> str:
    """The gate's rule, restated: every version beats its base (1/8); on the newest version's test
    data, the most hits wins, a tie going to the newer version. history: (version, fp, hits)."""
    newest_fp = max(history, key=lambda h: int(h[0]))[1]
    same = [h for h in history if h[1] == newest_fp]
    return max(same, key=lambda h: (h[2], int(h[0])))[0]


def test_two_machines_race_twenty_rounds_champion_is_always_the_best(server, tiny_t5_dir, tmp_path,
                                                                      monkeypatch):
    homes = [_home(server, "machine-a"), _home(server, "machine-b")]
    # The worst interleaving: both registrations reach the alias step at the same moment (a
    # read-decide-set there loses about half the contested rounds).
    align, real_lock = threading.Barrier(2), register_module.registration_lock

    def aligned_lock(name, lock_dir):
        with contextlib.suppress(threading.BrokenBarrierError):
            align.wait(timeout=60)
        return real_lock(name, lock_dir)

    monkeypatch.setattr(register_module, "registration_lock", aligned_lock)
    plan = _rounds()
    cands = {}
    for r, (fp, *hits) in enumerate(plan):
        for m, h in enumerate(hits):
            adapter, report, _ = make_candidate(tmp_path / f"r{r}m{m}", tiny_t5_dir, seed=100 + 2 * r + m,
                                                lora_hits=h, data_fingerprint=fp)
            cands[r, m] = (adapter, report)
    barrier = threading.Barrier(2)

    def register(r: int, m: int):
        barrier.wait()
        adapter, report = cands[r, m]
        return register_adapter("race", adapter, report, retries=6, backoff=0.2, max_backoff=2.0,
                                home=homes[m])

    client = client_for(server.uri)
    history, wrong = [], []
    with ThreadPoolExecutor(2) as pool:
        for r, (fp, *hits) in enumerate(plan):
            results = list(pool.map(lambda m, r=r: register(r, m), range(2)))
            history += [(res.version, fp, h) for res, h in zip(results, hits, strict=True)]
            aliases = {k: str(v) for k, v in client.get_registered_model("race-lora").aliases.items()}
            champion = _expected_champion(history)
            challenger = str(max(int(v) for v, _, _ in history if v != champion))
            if aliases != {"champion": champion, "challenger": challenger}:
                wrong.append((r, aliases.get("champion") == champion,
                              f"round {r}: {aliases}, expected v{champion} / v{challenger}"))
    right = ROUNDS - sum(not champion_ok for _, champion_ok, _ in wrong)
    print(f"racing rounds with the right champion: {right}/{ROUNDS}; "
          f"both aliases right: {ROUNDS - len(wrong)}/{ROUNDS}")
    assert not wrong, f"{[w for *_, w in wrong]}; history (version, test data, hits): {history}"


# ---- Prefect's global concurrency limit, held by a real Prefect server -----------------------------
def _hold_twice(lock_dir_root) -> list[tuple[float, float]]:
    """Two threads (two homes: no shared file lock) hold `registration_lock` for 1 s each."""
    spans, start = [], threading.Barrier(2)

    def hold(m: int) -> None:
        start.wait()
        with registration_lock("race-lora", lock_dir_root / f"home-{m}" / "locks"):
            t0 = time.monotonic()
            time.sleep(1.0)
            spans.append((t0, time.monotonic()))

    # Prefect's settings live in context variables, which pool threads do not inherit: copy them.
    contexts = [contextvars.copy_context() for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda m: contexts[m].run(hold, m), range(2)))
    return sorted(spans)


def test_prefect_limit_serialises_the_alias_step_across_machines(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):  # no Prefect API: only per-home file locks
        (a, b) = _hold_twice(tmp_path / "without")
        assert b[0] < a[1], "without Prefect the two homes' alias steps overlap"
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        (a, b) = _hold_twice(tmp_path / "with")
        assert b[0] >= a[1], f"alias steps overlapped under the Prefect limit: {a}, {b}"
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(f"{LIMIT_PREFIX}race-lora")
        assert (limit.limit, limit.active_slots) == (1, 0)
