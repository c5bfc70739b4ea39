"""redact_uri / redact_text: credentials never survive, plain URIs pass through unchanged."""

import pytest

from lora_module.redact import redact_text, redact_uri


@pytest.mark.parametrize(("uri", "expected"), [
    ("http://alice:PW@host:5000/", "http://***@host:5000/"),
    ("postgresql+psycopg2://u:p%40w@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
    ("https://token@host/x", "https://***@host/x"),
    ("s3://bucket/k?X-Amz-Signature=abc&x=1", "s3://bucket/k?X-Amz-Signature=***&x=1"),
    ("http://h/?password=zz", "http://h/?password=***"),
    ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
    ("file:///tmp/x", "file:///tmp/x"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("/plain/path", "/plain/path"),
    (None, None),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_text_masks_every_uri_in_a_message():
    text = "registry unreachable at http://alice:PW@127.0.0.1:5000: see https://h/x?token=zz&a=1"
    out = redact_text(text)
    assert "PW" not in out and "zz" not in out and "alice" not in out
    assert out == "registry unreachable at http://***@127.0.0.1:5000: see https://h/x?token=***&a=1"
