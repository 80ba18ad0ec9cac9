"""Dotted key paths into params data (``train.parts[0].lr``): read, set, flatten, nest."""

from __future__ import annotations

import re
from typing import Any

from pneumoseg.params.errors import ParamsError

MISSING = object()  # get_path: the key does not exist


def get_path(data: Any, path: str) -> Any:
    """The value at a dotted path such as ``train.parts[0].lr`` (a sentinel when absent)."""
    node = data
    for tok in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if tok.startswith("["):
            i = int(tok[1:-1])
            if not isinstance(node, list) or i >= len(node):
                return MISSING
            node = node[i]
        elif isinstance(node, dict) and tok in node:
            node = node[tok]
        else:
            return MISSING
    return node


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts/lists into ``{"a.b.0.c": value}`` (lists of scalars stay whole)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        for i, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}.{i}"))
    else:
        out[prefix] = obj
    return out


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``data`` at a dotted path such as ``train.parts[0].lr`` (creating dicts as needed)."""
    tokens = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    if not tokens:
        raise ParamsError(f"override: empty key path {path!r}")
    node: Any = data
    for tok, nxt in zip(tokens, [*tokens[1:], None], strict=True):
        key: Any = int(tok[1:-1]) if tok.startswith("[") else tok
        if nxt is None:
            if isinstance(key, int) and (not isinstance(node, list) or key >= len(node)):
                raise ParamsError(f"override {path}: index {key} out of range")
            node[key] = value
            return
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                raise ParamsError(f"override {path}: index {key} out of range")
            node = node[key]
        else:
            if not isinstance(node, dict):
                raise ParamsError(f"override {path}: {tok} is not a mapping")
            node = node.setdefault(key, {} if not nxt.startswith("[") else [])


def nest(values: dict[str, Any]) -> dict[str, Any]:
    """``{"data.size": 256}`` -> ``{"data": {"size": 256}}`` (the layout of params.yaml)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        set_path(out, key, value)
    return out
