"""The MLflow model registry of the packaged ensemble: ``pneumoseg models list | promote VERSION
| rollback | show VERSION``.

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
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

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
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point mlflow's fluent API at ``uri`` for the block, then restore the previous state
    (``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in ``os.environ``)."""
    import mlflow

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in keys}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


def _score(tags: dict[str, str], key: str) -> float | None:
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
        (k for k in HONEST_SCORES if None not in (_score(new_tags, k), _score(old_tags, k))),
        HONEST_SCORES[-1],
    )
    new, old = _score(new_tags, key), _score(old_tags, key)
    what = key.removeprefix("kaggle_dice_").replace("_", "-")
    if new is not None and (old is None or new > old):
        promote(client, name, version)
        was = "n/a" if old is None else f"{old:.4f}"
        return True, f"{what} dice {new:.4f} beats champion v{current} ({was})"
    shown = "n/a" if new is None else f"{new:.4f}"
    return False, f"{what} dice {shown} does not beat champion v{current}"


def _time(ms: int | None) -> str:
    if not ms:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def list_versions(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Every version, newest first, with aliases, creation time, commit and scores."""
    with mlflow_errors("list"):
        model = registered_model(client, name)
        versions = client.search_model_versions(f"name = '{name}'", max_results=10000)
    by_version: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    out = []
    for mv in sorted(versions, key=lambda m: int(m.version), reverse=True):
        tags = dict(mv.tags or {})
        out.append(
            {
                "version": str(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "created": _time(mv.creation_timestamp),
                "git_commit": tags.get("git_commit", ""),
                "kaggle_dice": _score(tags, "kaggle_dice"),
                "kaggle_dice_cross_fitted": _score(tags, "kaggle_dice_cross_fitted"),
                "kaggle_dice_untouched": _score(tags, "kaggle_dice_untouched"),
                "run_id": mv.run_id,
                "status": mv.status,
            }
        )
    return out


def describe_version(client: MlflowClient, name: str, ref: str | None) -> dict[str, Any]:
    """Params, metrics and lineage of one version (its register run and training runs)."""
    from mlflow.exceptions import MlflowException

    with mlflow_errors("show"):
        mv = get_version(client, name, ref)
        model = registered_model(client, name)
    tags = dict(mv.tags or {})
    params: dict[str, str] = {}
    metrics: dict[str, float] = {}
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
            params, metrics = dict(run.data.params), dict(run.data.metrics)
        except MlflowException:
            pass
    training = []
    for run_id in [r for r in tags.get("training_run_ids", "").split(",") if r]:
        entry: dict[str, Any] = {"run_id": run_id}
        try:
            run = client.get_run(run_id)
            entry.update(
                fold=run.data.tags.get("fold"),
                status=run.info.status,
                val_kaggle_dice=run.data.metrics.get("val_kaggle_dice"),
            )
        except MlflowException:
            entry["status"] = "not found"
        training.append(entry)
    return {
        "name": name,
        "version": str(mv.version),
        "aliases": sorted(a for a, v in model.aliases.items() if str(v) == str(mv.version)),
        "created": _time(mv.creation_timestamp),
        "status": mv.status,
        "run_id": mv.run_id,
        "model_uri": f"models:/{name}/{mv.version}",
        "source": mv.source,
        "metrics": metrics,
        "lineage": {**{k: tags.get(k, "") for k in LINEAGE_TAGS}, "training_runs": training},
        "tags": tags,
        "params": params,
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The terminal table of :func:`list_versions`."""
    header = ("version", "aliases", "created", "commit", "kaggle_dice", "cross_fitted", "untouched")
    body = [
        (
            r["version"],
            ",".join(r["aliases"]) or "-",
            r["created"],
            (r["git_commit"] or "-")[:10],
            _fmt(r["kaggle_dice"]),
            _fmt(r["kaggle_dice_cross_fitted"]),
            _fmt(r["kaggle_dice_untouched"]),
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=False)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *body)
    )


def format_show(info: dict[str, Any]) -> str:
    """Human-readable :func:`describe_version`."""
    lines = [
        f"{info['name']} version {info['version']}"
        + (f"  [{', '.join(info['aliases'])}]" if info["aliases"] else ""),
        f"  created   {info['created']}  ({info['status']})",
        f"  uri       {info['model_uri']}",
        f"  run       {info['run_id']}",
        "metrics:",
        *(f"  {k} = {v:.6g}" for k, v in sorted(info["metrics"].items())),
        "lineage:",
    ]
    lineage = info["lineage"]
    lines += [f"  {k} = {lineage[k]}" for k in LINEAGE_TAGS if k != "training_run_ids"]
    for run in lineage["training_runs"]:
        score = run.get("val_kaggle_dice")
        lines.append(
            f"  training run {run['run_id']} fold {run.get('fold', '?')} ({run['status']})"
            + (f" val_kaggle_dice {score:.4f}" if score is not None else "")
        )
    lines.append("params:")
    lines += [f"  {k} = {v}" for k, v in sorted(info["params"].items())]
    return "\n".join(lines)


def run(
    params: Params,
    progress: bool = True,
    action: str = "list",
    version: str | None = None,
    json_out: bool = False,
) -> Any:
    """CLI entry of ``pneumoseg models``."""
    name = params.mlflow.registered_model
    client = open_client(params)
    if action == "list":
        rows = list_versions(client, name)
        print(json.dumps(rows, indent=2) if json_out else format_table(rows))
        return rows
    if action == "promote":
        previous, new = promote(client, name, version or "")
        result = {"name": name, "from": previous, "to": new}
        if json_out:
            print(json.dumps(result))
        elif previous == new:
            print(f"models: version {new} of {name} is already {CHAMPION}")
        else:
            print(f"models: {CHAMPION} of {name}: {previous or 'none'} -> {new}")
        return result
    if action == "rollback":
        if version:
            raise RegistryError("rollback takes no version (it goes back one champion)")
        old, new = rollback(client, name)
        result = {"name": name, "from": old, "to": new}
        print(
            json.dumps(result)
            if json_out
            else f"models: rolled back {CHAMPION} of {name}: {old} -> {new}"
        )
        return result
    if action == "show":
        info = describe_version(client, name, version)
        print(json.dumps(info, indent=2) if json_out else format_show(info))
        return info
    raise RegistryError(f"unknown action {action!r}: list, promote, rollback or show")
