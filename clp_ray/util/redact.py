"""Keep credentials out of what clp-ray logs and records, and only there.

A URI may carry secrets — ``s3://KEY:SECRET@bucket/...``, ``https://user:password@mlflow-host``,
``...?secret_key=...&session_token=...``. They stay in the values clp-ray *uses* (storage paths,
tracking URIs, checkpoint locations built from them), and are replaced by ``***`` in everything it
*shows or records*: MLflow params and tags, the logged ``config.yaml`` and reports, log lines (a
logging filter) and ``--summary`` files.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
# scheme://user:password@  or  scheme://token@  (userinfo before a host)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s?#]+)@")
# query parameters whose value is a secret (access keys, tokens, passwords, signatures)
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_\-]*(?:secret|password|passwd|token|signature|access[_-]?key|api[_-]?key|credential)"
    r"[A-Za-z0-9_\-]*))=(?P<value>[^&#\s]*)", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every URI's userinfo and secret query values replaced by ``***``."""
    if not isinstance(text, str) or ("://" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}={MASK}", text)


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


class RedactingFilter(logging.Filter):
    """Redacts each record's formatted message (its arguments included) before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error handling
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_filter() -> None:
    """Attach :class:`RedactingFilter` to every handler of the root logger (idempotent)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
