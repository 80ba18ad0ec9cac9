"""``pneumoseg models list | promote VERSION | rollback | show VERSION``: the registered
versions of the packaged ensemble, their lineage, and the ``champion`` alias (see
:mod:`pneumoseg.registry`)."""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any

from pneumoseg.params import Params
from pneumoseg.registry import (
    CHAMPION,
    LINEAGE_TAGS,
    RegistryError,
    get_version,
    mlflow_errors,
    open_client,
    promote,
    registered_model,
    registry_lock,
    rollback,
    tag_score,
)
from pneumoseg.tracking import tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


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
                "kaggle_dice": tag_score(tags, "kaggle_dice"),
                "kaggle_dice_cross_fitted": tag_score(tags, "kaggle_dice_cross_fitted"),
                "kaggle_dice_untouched": tag_score(tags, "kaggle_dice_untouched"),
                "kaggle_dice_untouched_ci95": interval(tags, "kaggle_dice_untouched"),
                "pipeline_run_id": tags.get("pipeline_run_id"),
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


def interval(tags: dict[str, str], key: str) -> list[float] | None:
    """A score's 95% interval from its ``_ci95_low`` / ``_high`` tags (None: not recorded,
    e.g. a version registered before the interval was)."""
    low, high = tag_score(tags, f"{key}_ci95_low"), tag_score(tags, f"{key}_ci95_high")
    return None if low is None or high is None else [low, high]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_ci(value: float | None, ci: list[float] | None) -> str:
    return _fmt(value) + (f" ({ci[0]:.4f}-{ci[1]:.4f})" if ci else "")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The terminal table of :func:`list_versions`: the untouched score (the number to expect
    on new data) with its 95% interval first, the optimistic ones after it."""
    header = (
        "version",
        "aliases",
        "created",
        "commit",
        "untouched (95% CI)",
        "cross_fitted",
        "in-sample",
    )
    body = [
        (
            r["version"],
            ",".join(r["aliases"]) or "-",
            r["created"],
            (r["git_commit"] or "-")[:10],
            _fmt_ci(r["kaggle_dice_untouched"], r["kaggle_dice_untouched_ci95"]),
            _fmt(r["kaggle_dice_cross_fitted"]),
            _fmt(r["kaggle_dice"]),
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
        with registry_lock(tracking_uri(params.mlflow)):
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
        with registry_lock(tracking_uri(params.mlflow)):
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
