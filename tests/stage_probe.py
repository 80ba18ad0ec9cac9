"""Run one pipeline stage and report what it really read: every params key path (through a
recording params object), every pneumoseg module it imported and every file it opened.

    python tests/stage_probe.py STAGE [--fold K] [--member NAME] > report.json   (in a project)

or :func:`probe_in_child` in a process of a fork server that preloaded the heavy third-party
libraries (tests/pipeline_helpers.py builds the shared tiny pipeline that way).

The report is ``{"reads": [...], "modules": [...], "opened": {"r": [...], "w": [...]}}``; file
paths are relative to the project folder (files outside it are left out). Files written by
native code (OpenCV's imwrite/imread) are not seen by the audit hook; everything Python opens
(csv, json, numpy, torch, matplotlib, sqlite via the MLflow store) is.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel


class Recorder:
    """Wraps a params object: attribute access goes through, and every value read is recorded
    under its dotted key path (``train.parts.0.lr``). Calling a method of a section (e.g.
    ``model_dump``) records the whole section as read."""

    def __init__(self, obj: Any, path: str, reads: set[str]) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name: str) -> Any:
        obj, path, reads = self._obj, self._path, self._reads
        value = getattr(obj, name)
        fields = type(obj).model_fields if isinstance(obj, BaseModel) else {}
        if name not in fields:  # a method or property: it may read anything below here
            reads.add(path or "<root>")
            return value
        return wrap(value, f"{path}.{name}" if path else name, reads)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("params are read-only in a stage")

    def __repr__(self) -> str:
        return f"Recorder({self._path})"

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Sent to a worker process: the section itself, read as a whole."""
        self._reads.add(self._path)
        return copy.copy, (self._obj,)


class RecordingList(list):
    """A list of sections whose items are recorded as ``path.<index>``."""

    def __init__(self, items: list[Any], path: str, reads: set[str]) -> None:
        super().__init__(wrap(v, f"{path}.{i}", reads) for i, v in enumerate(items))
        self._path, self._reads = path, reads

    def __len__(self) -> int:
        self._reads.add(self._path)
        return super().__len__()


class RecordingDict(dict):
    """A mapping of plain mappings whose entries are recorded as ``path.<key>`` when read one
    by one; iterating over it (keys, values, items, len) records the whole mapping."""

    def __init__(self, items: dict[str, Any], path: str, reads: set[str]) -> None:
        super().__init__(items)
        self._path, self._reads = path, reads

    def __getitem__(self, key: str) -> Any:
        self._reads.add(f"{self._path}.{key}")
        return super().__getitem__(key)

    def __iter__(self) -> Any:
        self._reads.add(self._path)
        return super().__iter__()

    def __len__(self) -> int:
        self._reads.add(self._path)
        return super().__len__()

    def keys(self) -> Any:
        self._reads.add(self._path)
        return super().keys()

    def values(self) -> Any:
        self._reads.add(self._path)
        return super().values()

    def items(self) -> Any:
        self._reads.add(self._path)
        return super().items()


def wrap(value: Any, path: str, reads: set[str]) -> Any:
    if isinstance(value, BaseModel):
        return Recorder(value, path, reads)
    if isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
        return RecordingList(value, path, reads)
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        return RecordingDict(value, path, reads)  # e.g. ensemble.members: one entry is read
    if isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values()):
        reads.add(path)  # e.g. studies: a mapping of sections, read as a whole
        return value
    reads.add(path)
    return value


def probe(stage: str, fold: int | None = None, member: str | None = None) -> dict[str, Any]:
    """Run ``stage`` in the current folder through a recording params object and an audit
    hook (this process's last stage: a hook cannot be removed); what it read."""
    root = Path.cwd().resolve()
    opened: dict[str, set[str]] = {"r": set(), "w": set()}

    def audit(event: str, event_args: tuple[Any, ...]) -> None:
        if event != "open" or not isinstance(event_args[0], (str, bytes, os.PathLike)):
            return
        path = root / os.fsdecode(event_args[0])
        mode = event_args[1] if isinstance(event_args[1], str) else "r"
        flags = event_args[2] if len(event_args) > 2 and isinstance(event_args[2], int) else 0
        writing = bool(any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR))
        if not writing and not path.exists():
            return  # e.g. a name relative to another folder (os.open with dir_fd)
        try:
            rel = path.resolve().relative_to(root)
        except (ValueError, OSError):
            return
        opened["w" if writing else "r"].add(str(rel))

    from pneumoseg.params import load_params

    params = load_params("params.yaml")
    reads: set[str] = set()
    recorder = Recorder(params, "", reads)
    import importlib

    module = importlib.import_module(f"pneumoseg.stages.{stage}")
    sys.addaudithook(audit)
    kwargs: dict[str, Any] = {"progress": False}
    if fold is not None:
        kwargs["fold"] = fold
    if member is not None:
        kwargs["member"] = member
    module.run(recorder, **kwargs)
    modules = sorted(
        str(Path(m.__file__).resolve())
        for name, m in list(sys.modules.items())
        if name.split(".")[0] == "pneumoseg" and getattr(m, "__file__", None)
    )
    return {
        "reads": sorted(reads),
        "modules": modules,
        "opened": {k: sorted(v) for k, v in opened.items()},
    }


def probe_in_child(
    project: str, environ: dict[str, str], out: str, stage: str, fold: int | None,
    member: str | None,
) -> None:  # fmt: skip
    """A process of a fork server whose parent preloaded the third-party libraries (no
    pneumoseg module) runs :func:`probe` in ``project`` and writes its report to ``out``: the
    same report as a new process, without its five seconds of imports."""
    os.chdir(project)
    os.environ.clear()
    os.environ.update(environ)
    Path(out).write_text(json.dumps(probe(stage, fold, member)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage")
    parser.add_argument("--fold", type=int)
    parser.add_argument("--member")
    args = parser.parse_args()
    report = probe(args.stage, args.fold, args.member)
    sys.stdout.flush()
    print("STAGE_PROBE " + json.dumps(report))


if __name__ == "__main__":
    main()
