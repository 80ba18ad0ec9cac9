"""The aliases of the packaged ensemble in the MLflow model registry (the ``models`` command
is :mod:`pneumoseg.commands.models`).

Aliases: ``challenger`` marks the newest registered version (set by ``pneumoseg register``);
``champion`` is the version to serve and moves only by :func:`promote` (by hand, or by
``register`` when ``registry.auto_promote`` is on and the challenger's cross-fitted score wins).
Every champion is recorded in the registered-model tag ``champion_history``: a JSON list of
versions, oldest first, whose last entry is the current champion (a promoted version also gets
the tags ``promoted_at`` and ``previous_champion``). :func:`rollback` drops the
last entry and moves ``champion`` to the one before, so repeated rollbacks walk further back.

A version is named by its number (``3`` or ``v3``) or by an alias (``champion``, ``@champion``).
mlflow is imported inside the functions (the CLI imports this module).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumoseg.locks import file_lock, store_lock
from pneumoseg.params import Params
from pneumoseg.tracking import tracking_uri

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
HISTORY_MAX = 200  # entries kept in the tag (tag values are limited in size)
LINEAGE_TAGS = ("git_commit", "git_dirty", "data_hash", "params_hash", "training_run_ids")


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; ``str(err)`` is one line for the user."""


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """Turn MLflow exceptions into a one-line :class:`RegistryError`."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        first = (str(exc.message) or type(exc).__name__).strip().splitlines()[0][:300]
        raise RegistryError(f"{what}: {first}") from None


@contextlib.contextmanager
def registry_lock(uri: str) -> Iterator[None]:
    """One registry change at a time (register, promote, rollback), so no alias or history
    update is lost: the sqlite store's own lock, or for a server a lock file named after its
    URI in the temp folder (it serialises the processes of one machine; see README)."""
    if uri.startswith("sqlite:///"):
        with store_lock(uri):
            yield
        return
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with file_lock(Path(tempfile.gettempdir()) / f"pneumoseg-registry-{key}.lock"):
        yield


def open_client(params: Params) -> MlflowClient:
    """A client on ``tracking_uri(params.mlflow)`` (tracking and registry)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params.mlflow)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def registered_model(client: MlflowClient, name: str) -> Any:
    """The registered model, or a clear error when nothing was registered yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(
                f"no registered model {name!r} in the tracking store "
                "(run `pneumoseg register` first)"
            ) from None
        raise RegistryError(f"registry: {str(exc.message).splitlines()[0]}") from None


def describe(client: MlflowClient, name: str, version: Any, about_model: str, about: str) -> None:
    """Set ``version``'s description and, when it changed, the registered model's."""
    client.update_model_version(name, str(version.version), about)
    if registered_model(client, name).description != about_model:
        client.update_registered_model(name, about_model)


def get_version(client: MlflowClient, name: str, ref: str | None) -> ModelVersion:
    """A version by number (``3``, ``v3``) or alias (``champion``, ``@champion``)."""
    from mlflow.exceptions import MlflowException

    if ref is None or not str(ref).strip():
        raise RegistryError("give a model version (a number or an alias such as champion)")
    ref = str(ref).strip().lstrip("@")
    number = ref[1:] if ref[:1] in ("v", "V") and ref[1:].isdigit() else ref
    registered_model(client, name)
    try:
        if number.isdigit():
            return client.get_model_version(name, number)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException:
        what = f"version {number}" if number.isdigit() else f"alias {ref!r}"
        raise RegistryError(f"model {name!r} has no {what}") from None


def is_model_uri(model: str) -> bool:
    """Whether ``--model`` names an MLflow URI (``models:/``, ``runs:/``, any ``scheme://``)
    rather than a local folder."""
    return "://" in model or model.startswith(("models:/", "runs:/"))


def default_model(params: Params) -> str:
    """What ``predict`` and ``serve`` use without ``--model``: the champion."""
    return f"models:/{params.mlflow.registered_model}@{CHAMPION}"


def download_model(params: Params, model: str, dst: Path) -> tuple[Path, dict[str, Any]]:
    """Download an MLflow model URI into ``dst``; ``models:/name@alias`` is pinned to its
    version first. Returns (local folder, what was resolved: model, name, version, run_id)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pneumoseg.tracking import scoped_env, using_tracking_uri

    uri = tracking_uri(params.mlflow)
    info: dict[str, Any] = {"model": model}
    if model.startswith("models:/"):
        ref = model.removeprefix("models:/").rstrip("/")
        name, sep, alias = ref.partition("@")
        if not sep:
            name, _, alias = ref.partition("/")
        if name and alias and "/" not in alias:
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            try:
                mv = get_version(client, name, alias)
            except RegistryError as exc:
                raise RegistryError(f"--model {model}: {exc}") from None
            info.update(name=name, version=str(mv.version), run_id=mv.run_id)
            model = f"models:/{name}/{mv.version}"
    try:  # no progress bar line per file; models:/ sources resolve through the fluent API
        with scoped_env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"), using_tracking_uri(uri):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=model, dst_path=str(dst), tracking_uri=uri, registry_uri=uri
            )
    except MlflowException as exc:
        first = str(exc.message).strip().splitlines()[0][:300]
        raise RegistryError(f"--model {info['model']}: {first}") from None
    return Path(local), info


def version_with_tag(client: MlflowClient, name: str, key: str, value: str) -> Any | None:
    """The newest version of ``name`` whose tag ``key`` is ``value``, or None (also when
    nothing is registered yet)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.{key} = '{value}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version), default=None)


def version_exists(client: MlflowClient, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException:
        return False
    return True


def _history(model: Any) -> tuple[list[str], str | None]:
    """(champion history ending with the current champion, current champion or None)."""
    try:
        history = [str(v) for v in json.loads(model.tags.get(HISTORY_TAG, "[]"))]
    except (TypeError, ValueError):
        history = []
    current = model.aliases.get(CHAMPION)
    current = str(current) if current is not None else None
    if current is not None and (not history or history[-1] != current):
        history.append(current)  # the alias was moved outside pneumoseg
    return history, current


def _save_history(client: MlflowClient, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_MAX:]))


def promote(client: MlflowClient, name: str, ref: str) -> tuple[str | None, str]:
    """Move ``champion`` to version ``ref``; returns (previous champion or None, new one)."""
    with mlflow_errors("promote"):
        target = get_version(client, name, ref).version
        history, current = _history(registered_model(client, name))
        if current == str(target):
            return current, str(target)
        client.set_registered_model_alias(name, CHAMPION, str(target))
        history.append(str(target))
        _save_history(client, name, history)
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        client.set_model_version_tag(name, str(target), "promoted_at", now)
        client.set_model_version_tag(name, str(target), "previous_champion", current or "none")
    return current, str(target)


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Move ``champion`` back to the previous champion; returns (from, to)."""
    with mlflow_errors("rollback"):
        history, current = _history(registered_model(client, name))
        if current is None:
            raise RegistryError(f"model {name!r} has no champion to roll back from")
        history = history[:-1]
        while history and not version_exists(client, name, history[-1]):
            history.pop()  # deleted versions are skipped
        if not history:
            raise RegistryError(
                f"nothing to roll back to: version {current} is the first recorded champion "
                f"of {name!r}"
            )
        previous = history[-1]
        client.set_registered_model_alias(name, CHAMPION, previous)
        _save_history(client, name, history)
    return current, previous


def tag_score(tags: dict[str, str], key: str) -> float | None:
    """A version tag as a float; None when missing, not a number or NaN."""
    try:
        value = float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if value == value else None  # NaN -> None


HONEST_SCORES = ("kaggle_dice_untouched", "kaggle_dice_cross_fitted")  # preferred first


def auto_promote(client: MlflowClient, name: str, version: str) -> tuple[bool, str]:
    """Promote ``version`` when there is no champion or its honest score is higher: the
    untouched score when both versions have one, else the cross-fitted one."""
    with mlflow_errors("auto-promote"):
        _, current = _history(registered_model(client, name))
        new_tags = client.get_model_version(name, version).tags
        if current is None:
            promote(client, name, version)
            return True, "no champion yet"
        old_tags = client.get_model_version(name, current).tags
    key = next(
        (k for k in HONEST_SCORES if None not in (tag_score(new_tags, k), tag_score(old_tags, k))),
        HONEST_SCORES[-1],
    )
    new, old = tag_score(new_tags, key), tag_score(old_tags, key)
    what = key.removeprefix("kaggle_dice_").replace("_", "-")
    if new is not None and (old is None or new > old):
        promote(client, name, version)
        was = "n/a" if old is None else f"{old:.4f}"
        return True, f"{what} dice {new:.4f} beats champion v{current} ({was})"
    shown = "n/a" if new is None else f"{new:.4f}"
    return False, f"{what} dice {shown} does not beat champion v{current}"
