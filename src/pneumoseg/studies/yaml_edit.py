"""Writing values into ``params.yaml`` in place: only the targeted values change (comments,
order and layout stay), or as ``dvc exp run -S`` overrides."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pneumoseg.files import write_text_atomic
from pneumoseg.params import MISSING, Params, ParamsError, format_validation_error, get_path

PROVENANCE_KEY = "provenance.studies"


def yaml_scalar(value: Any) -> str:
    """``value`` as one line of YAML (``1.25``, ``linear``, ``true``, ``null``, or a flow
    collection such as ``[{name: a, trial: 3}]``)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return text.removesuffix("\n...\n").split("\n", 1)[0]


def _scalar_end(line: str, col: int, flow: bool) -> int:
    """End column of the YAML scalar that starts at ``col`` (quoted or plain)."""
    if line[col : col + 1] in ("'", '"'):
        quote, i = line[col], col + 1
        while i < len(line):
            if line[i] == "\\" and quote == '"':
                i += 2
                continue
            if line[i] == quote:
                if quote == "'" and line[i + 1 : i + 2] == "'":
                    i += 2
                    continue
                return i + 1
            i += 1
        return len(line.rstrip("\n"))
    stops = re.compile(r"\s+#|[,}\]]|\n" if flow else r"\s+#|\n")
    m = stops.search(line, col)
    end = m.start() if m else len(line)
    return len(line[:end].rstrip())


def edit_yaml_scalars(text: str, values: dict[str, Any]) -> tuple[str, list[tuple[str, Any, Any]]]:
    """Replace the scalar values at params paths in YAML ``text``, touching nothing else (each
    value is rewritten in place at its line and column). Returns the new text and
    (path, old, new) for each change. Every path must already be written in the text."""
    from ruamel.yaml import YAML

    data = YAML().load(text)
    lines = text.splitlines(keepends=True)
    edits = []
    changes = []
    for key, value in values.items():
        tokens = re.findall(r"[^.\[\]]+|\[\d+\]", key)
        *head, last_tok = tokens
        parent = get_path(data, "".join(t if t.startswith("[") else f".{t}" for t in head)[1:])
        last: Any = int(last_tok[1:-1]) if last_tok.startswith("[") else last_tok
        present = parent is not MISSING and (
            last in parent if isinstance(parent, dict) else 0 <= last < len(parent)
        )
        if not present:
            raise ValueError(
                f"params file: {key} is not written in the file; add it (with any value) so "
                "`study apply` can set it in place"
            )
        old = parent[last]
        line, col = parent.lc.value(last) if isinstance(parent, dict) else parent.lc.item(last)
        if isinstance(old, (dict, list)):
            if _flow_end(lines[line], col) is None:
                raise ValueError(
                    f"params file: {key} is a mapping or list over several lines; write it "
                    "in flow style on one line (e.g. [] or {}) so `study apply` can set it"
                )
            edits.append((line, col, None, yaml_scalar(value)))
        else:
            edits.append((line, col, bool(parent.fa.flow_style()), yaml_scalar(value)))
        changes.append((key, old, value))
    for line, col, flow, new in sorted(edits, reverse=True):
        text_line = lines[line]
        end = _flow_end(text_line, col) if flow is None else _scalar_end(text_line, col, flow)
        lines[line] = text_line[:col] + new + text_line[end:]
    return "".join(lines), changes


def _flow_end(line: str, col: int) -> int | None:
    """End column of the one-line flow collection (``[...]``, ``{...}``) starting at ``col``;
    None when there is none or it continues on another line."""
    if line[col : col + 1] not in ("[", "{"):
        return None
    depth, quote, i = 0, "", col
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def apply_to_file(path: Path, values: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Write ``values`` (params paths) into the YAML file in place (only those values change:
    comments, order and layout stay); the result is validated before the file is replaced."""
    import yaml
    from pydantic import ValidationError

    text = path.read_text()
    if PROVENANCE_KEY in values and get_path(yaml.safe_load(text), PROVENANCE_KEY) is MISSING:
        text = (
            text.rstrip("\n")
            + "\n\nprovenance:  # written by `pneumoseg study apply`\n  studies: []\n"
        )
    new_text, changes = edit_yaml_scalars(text, values)
    data = yaml.safe_load(new_text)
    for key, value in values.items():  # the edit must read back as exactly these values
        if get_path(data, key) != value:
            raise ValueError(f"{path.name}: {key}: could not be set in place")
    try:
        Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(format_validation_error(err, path.name).splitlines()[0]) from None
    write_text_atomic(path, new_text)
    return changes


def hydra_value(value: Any) -> str:
    """``value`` in the override grammar of ``dvc exp run -S`` (Hydra's): ``{key:value}``
    with bare keys, quoted strings, ``[a,b]`` lists."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return json.dumps(value)  # numbers, true/false, null
