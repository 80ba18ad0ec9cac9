"""The one redactor: no password from a URL reaches an output file, a log line, an error
message or an MLflow param, tag or artifact; and the keyed pseudonyms of ImageIds
(``data.pseudonymize_ids``, key in ``$PNEUMOSEG_ID_KEY``, never in the repo).

``postgresql://user:secret@host/db`` becomes ``postgresql://user:***@host/db`` (the password
runs to the last ``@`` of the URL, so a raw ``@``, ``/``, ``:`` or ``%`` in it is masked too), a
password given as a query parameter (``?password=secret``) becomes ``?password=***``, a
``NAME=value`` whose name ends in SECRET, PASSWORD, TOKEN or KEY (``AWS_SECRET_ACCESS_KEY=...``)
becomes ``NAME=***``, and the value of every such environment variable of this process
(``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``, ``PNEUMOSEG_ID_KEY``, ...) is masked
wherever it appears. :func:`redact` walks dicts, lists and tuples; :func:`install` applies it to
every log record of every logger (libraries' own handlers included).
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
# Linear time on any text (a 5 MB minified report included): each name is matched only from
# its first character (a lookbehind) and consumed possessively, with no backtracking.
# user:password@ of a URL; the password runs to the URL's last "@" (quotes and spaces end it)
_USERINFO = re.compile(
    r"(?P<head>(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*+://[^:/?#@\s\"'<>]*+:)[^\s\"'<>]*@"
)
_QUERY = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd|secret|token)=)[^&;#\s]*", re.I)
# NAME=value (or "NAME": "value") where NAME ends in SECRET, PASSWORD, TOKEN or KEY
_SECRET_END = r"(?:(?<=SECRET)|(?<=PASSWORD)|(?<=PASSWD)|(?<=TOKEN)|(?<=_KEY)|(?<=KEY_ID))"
_ASSIGNED = re.compile(
    rf"(?P<head>(?<![A-Za-z0-9_.-])[A-Za-z0-9_.-]++{_SECRET_END}[\"']?\s*[=:]\s*[\"']?)"
    r"(?P<value>[A-Za-z0-9/+=_.~%@:!*#$^-]{6,})",  # what a credential is made of (not code)
    re.I,
)
# environment variables whose values are secrets wherever they appear
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY_ID|_KEY)$", re.I)
_MIN_SECRET = 6  # shorter values are too common to mask (and too short to be a real secret)


def _secret_values() -> list[str]:
    import os

    values = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_SECRET}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` with every URL password, assigned secret and secret environment value masked."""
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", text)
    text = _QUERY.sub(lambda m: f"{m['head']}{MASK}", text)
    text = _ASSIGNED.sub(lambda m: f"{m['head']}{MASK}", text)
    for value in _secret_values():
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact(value: Any) -> Any:
    """:func:`redact_text` applied to every string inside ``value`` (dict keys included)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message and arguments (see :func:`redact_record`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """The record with its message and arguments redacted (an argument of another type, such
    as an exception, is replaced by its redacted text only when its text holds a secret), and
    its traceback's text too."""

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return redact_text(value)
        if isinstance(value, (int, float)) or value is None:
            return value
        text = str(value)
        masked = redact_text(text)
        return value if masked == text else masked

    record.msg = clean(record.msg)
    if isinstance(record.args, tuple):
        record.args = tuple(clean(a) for a in record.args)
    elif isinstance(record.args, dict):
        record.args = {k: clean(v) for k, v in record.args.items()}
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
    return record


def install() -> None:
    """Redact every log record of the process when it is made, whichever logger and handler
    (MLflow, SQLAlchemy, alembic, Optuna and DVC have handlers of their own) it goes to."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "pneumoseg_redacts", False):
        return

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(factory(*args, **kwargs))

    make.pneumoseg_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make)


ID_KEY_ENV = "PNEUMOSEG_ID_KEY"


def id_key() -> bytes:
    """The pseudonym key from ``$PNEUMOSEG_ID_KEY`` (one line naming the way out if unset)."""
    import os

    key = os.environ.get(ID_KEY_ENV, "")
    if len(key) < 16:
        raise ValueError(
            f"data.pseudonymize_ids: set {ID_KEY_ENV} to a secret of 16+ characters kept outside "
            "the repo (the same key gives the same pseudonyms)"
        )
    return key.encode()


def pseudonym(image_id: str, key: bytes) -> str:
    """``p`` + 24 hex digits of HMAC-SHA256(key, ImageId): stable for one key, not reversible
    without it (``pneumoseg convert --id-map FILE`` writes the table back)."""
    import hashlib
    import hmac

    return "p" + hmac.new(key, image_id.encode(), hashlib.sha256).hexdigest()[:24]
