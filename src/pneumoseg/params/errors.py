"""One-line messages for params mistakes: ``params.yaml: train.parts[1].lr: must be > 0``."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError


class ParamsError(ValueError):
    """A params file that cannot be used; ``str(err)`` is the one-line message for the user."""


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "<root>"


_MESSAGES = {
    "greater_than": "must be > {gt:g}",
    "greater_than_equal": "must be >= {ge:g}",
    "less_than": "must be < {lt:g}",
    "less_than_equal": "must be <= {le:g}",
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _describe(error: dict[str, Any]) -> str:
    template = _MESSAGES.get(error["type"])
    if template:
        return template.format(**error.get("ctx", {}))
    msg = error["msg"]
    if error["type"].endswith("_type") or error["type"].endswith("_parsing"):
        msg += f" (got {error.get('input')!r})"
    return msg[0].lower() + msg[1:]


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``<source>: <key path>: <what is wrong>``; the first line leads."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path, message = _loc_to_path(loc), _describe(e)
        if e["type"] == "value_error":  # our validators: "<relative.key>: <problem>"
            message = message.removeprefix("value error, ")
            key, sep, rest = message.partition(": ")
            if sep and re.fullmatch(r"[\w.\[\]-]+", key):
                path = key if path == "<root>" else f"{path}.{key}"
                message = rest
        lines.append(f"{source}: {path}: {message}")
    return "\n".join(lines)
