"""No code from a checkpoint URL (#27): a remote `ckpt_path` is refused in one line before anything loads.

A checkpoint is a pickle, and Lightning loads URL and fsspec checkpoints with `weights_only=False`: before
this, `fit --ckpt_path http://127.0.0.1:PORT/evil.ckpt` ran the payload the server sent. Each test serves
such a payload on 127.0.0.1 (it creates a marker file when unpickled) and checks the marker never appears,
nothing was downloaded, and the one `error:` line names the path.
"""

from __future__ import annotations

import http.server
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_training import prepare_tiny

from lora_module.training.cli import main
from lora_module.training.launcher import run_fit
from lora_module.training.resume import RemoteCheckpointError, check_local_checkpoint
from lora_pipeline.flows.pipeline import load_specs
from lora_pipeline.flows.specs import TaskSpecError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "deploy" / "configs"
DEMO_CONFIG = CONFIGS / "demo_summary_lora.yaml"


class _Payload:
    """Unpickling this opens (creates) the marker file: proof that the checkpoint's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def evil_server(tmp_path) -> Iterator[tuple[str, Path, list[str]]]:
    """(URL of evil.ckpt on 127.0.0.1, marker file, paths the server was asked for)."""
    marker, body, hits = tmp_path / "PWNED", pickle.dumps(_Payload(tmp_path / "PWNED")), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/evil.ckpt", marker, hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, seq2seq_tokenizer_dir) -> Path:
    return prepare_tiny(seq2seq_tokenizer_dir, "seq2seq", tmp_path_factory.mktemp("prepared"))


def _fit_args(model: Path, prepared: Path, out: Path) -> list[str]:
    return ["fit", "--config", str(DEMO_CONFIG), "--model.model_name_or_path", str(model),
            "--data.prepared_dir", str(prepared), "--model.output_dir", str(out),
            "--trainer.logger", "false", "--trainer.max_steps", "1", "--trainer.accelerator", "cpu"]


@pytest.mark.parametrize("how", ["argument", "config file"])
def test_fit_refuses_a_checkpoint_url_and_runs_nothing(evil_server, tiny_t5_dir, prepared_dir, tmp_path,
                                                       capsys, how):
    url, marker, hits = evil_server
    args = _fit_args(tiny_t5_dir, prepared_dir, tmp_path / "out")
    if how == "argument":
        args += ["--ckpt_path", url]
    else:
        extra = tmp_path / "ckpt.yaml"
        extra.write_text(yaml.safe_dump({"ckpt_path": url}))
        args += ["--config", str(extra)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and url in err and "only local checkpoint files" in err, err
    assert not marker.exists() and hits == []
    assert not (tmp_path / "out").exists()  # nothing built, nothing written


@pytest.mark.parametrize("path", [
    "http://127.0.0.1:1/x.ckpt", "https://h/x.ckpt?sig=1", "s3://bucket/x.ckpt", "hf://org/repo/x.ckpt",
    "simplecache::http://h/x.ckpt", "memory://x.ckpt", "registry:my-model:v1", "data:,abc",
])
def test_every_remote_spelling_is_refused(path):
    with pytest.raises(RemoteCheckpointError, match="only local checkpoint files"):
        check_local_checkpoint(path)


@pytest.mark.parametrize("path", [None, "runs/x/checkpoints/last.ckpt", "/abs/last.ckpt", "file:///abs/x.ckpt"])
def test_local_paths_pass_the_check(path):
    check_local_checkpoint(path)


def test_launcher_refuses_before_starting_a_process(evil_server, tmp_path):
    url, marker, hits = evil_server
    for spelling in (["--ckpt_path", url], [f"--ckpt_path={url}"]):
        with pytest.raises(RemoteCheckpointError, match="only local checkpoint files"):
            run_fit(DEMO_CONFIG, spelling, output_dir=tmp_path / "out")
    assert not marker.exists() and hits == [] and not (tmp_path / "out").exists()


def test_a_deployments_train_overrides_cannot_reach_a_remote_checkpoint(evil_server, tmp_path):
    url, marker, hits = evil_server
    spec = {"name": "evil", "data_config": str(CONFIGS / "data_demo_summary.yaml"),
            "lora_config": str(DEMO_CONFIG), "base_model": "demo", "train_overrides": ["--ckpt_path", url]}
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(TaskSpecError, match="train_overrides --ckpt_path .*only local checkpoint files"):
        load_specs([str(path)], None, None, None, None, False, check=False)
    with pytest.raises(TaskSpecError, match="only local checkpoint files"):
        load_specs(["summary"], None, None, [f"--ckpt_path={url}"], None, False, check=False)
    assert not marker.exists() and hits == []
