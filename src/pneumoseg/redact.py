"""The one redactor: no password from a URL reaches an output file, a log line, an error
message or an MLflow param, tag or artifact; and the keyed pseudonyms of ImageIds
(``data.pseudonymize_ids``, key in ``$PNEUMOSEG_ID_KEY``, never in the repo).

``postgresql://user:secret@host/db`` becomes ``postgresql://user:***@host/db``, and a password
given as a query parameter (``?password=secret``) becomes ``?password=***``. :func:`redact`
walks dicts, lists and tuples; :class:`RedactingFilter` applies it to every log record.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)[^@/\s]*@")
_QUERY = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd|secret|token)=)[^&;#\s]*", re.I)


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it masked."""
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}", text)


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
    """Masks URL passwords in a record's message and arguments (attach it to handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.msg) if isinstance(record.msg, str) else record.msg
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        return True


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
