"""Where things live.

Two kinds of places:

- **Stores of record** (the MLflow tracking store and its artifact root, the Optuna journal):
  they must outlive any working copy, so a relative path in ``params.yaml`` resolves against
  the repo the user works in (:func:`repo_root`), never against the current directory.
  ``dvc exp run --temp`` and queued experiments run the stages in a temporary copy of the repo
  that is deleted afterwards; inside every stage command DVC sets ``DVC_ROOT`` to the original
  repo root, so their runs land in the user's stores.
- **Working files** of one run (``checkpoints/`` resume state, ``optuna/trials/`` trial
  folders) stay relative to the current directory: two queued experiments never share them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DVC_ROOT_ENV = "DVC_ROOT"


def repo_root(cwd: str | Path | None = None) -> Path:
    """``$DVC_ROOT`` (set by DVC inside stage commands), else the nearest folder at or above
    ``cwd`` holding a ``.dvc`` folder, else ``cwd`` itself."""
    env = os.environ.get(DVC_ROOT_ENV)
    if env:
        return Path(env).resolve()
    here = Path(cwd or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def in_repo(path: str | Path) -> Path:
    """A store of record: an absolute path as is, a relative one under :func:`repo_root`."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path


def has_scheme(location: str) -> bool:
    """Whether ``location`` is a URL (``s3://...``, ``file:///...``) rather than a path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", location) is not None


def sqlite_in_repo(uri: str) -> str:
    """``sqlite:///relative.db`` -> ``sqlite:////<repo root>/relative.db``; other URIs as is."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/"):
        return uri
    db = in_repo(uri.removeprefix(prefix))
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"{prefix}{db}"
