"""Credentials out of every URI we record, log, tag or print: the one helper.

    from lora_module.redact import redact_uri, redact_text
    redact_uri("http://alice:pw@host:5000/")          # 'http://***@host:5000/'
    redact_uri("postgresql+psycopg2://u:pw@db/mlflow") # 'postgresql+psycopg2://***@db/mlflow'
    redact_text(f"registry unreachable at {uri}: ...")  # any URI inside a message, redacted

A user puts credentials in `MLFLOW_TRACKING_URI` or a backend-store URI; the URI itself must keep
working for the connection, but no copy of it may reach a run tag, a JSON file, a version tag or
the console. Query parameters that carry secrets (`password=`, `token=`, S3 presigned signatures)
are masked too. Standard library only.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_PARAMS = re.compile(r"pass|secret|token|key|signature|credential|auth", re.IGNORECASE)
# scheme://userinfo@ inside free text; userinfo stops at whitespace, '/', or '@'.
_USERINFO_IN_TEXT = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/@]+)@")
_SECRET_QUERY_IN_TEXT = re.compile(r"(?P<name>[?&][^=&\s]*(?:pass|secret|token|key|signature|credential|auth)"
                                   r"[^=&\s]*=)[^&\s]+", re.IGNORECASE)


def redact_uri(uri: str | None) -> str | None:
    """`uri` with its user:password part and secret-looking query values replaced by ***."""
    if not uri or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return redact_text(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _SECRET_PARAMS.search(k) else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # urlunsplit would turn sqlite:////abs/path into sqlite://abs/path
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URI's credentials inside a free-form message (an error line, a log record) masked."""
    text = _USERINFO_IN_TEXT.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_QUERY_IN_TEXT.sub(lambda m: f"{m['name']}{MASK}", text)


def no_links_with_credentials(uri: str) -> None:
    """MLflow prints `View run ... at: <tracking URI>` when a run ends: not with a password in it. Set for
    the whole process before any run starts (an explicit user setting wins)."""
    if redact_uri(uri) != uri:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
