"""Stage ``register``: package the fold ensemble + flip TTA + tuned post-processing as ONE MLflow
model (:mod:`pneumoseg.serving.package`) and register it as a new version of
``mlflow.registered_model``, with the alias ``challenger`` and tags for lineage (git commit,
data hash, params hash, training run ids) and scores; ``champion`` moves only by promotion (or
``registry.auto_promote``). ``registry.out`` records the registry entry and the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pneumoseg.artifacts import output_dialect
from pneumoseg.files import read_json, write_json
from pneumoseg.lineage import lineage_tags
from pneumoseg.locks import store_lock
from pneumoseg.params import Params, digest, flatten, stage_values
from pneumoseg.serving.package import package_digest
from pneumoseg.tracking import Tracker, experiment_name, fluent_run, scoped_env, tracking_uri

log = logging.getLogger(__name__)


SCORES = ("kaggle_dice", "kaggle_dice_cross_fitted", "kaggle_dice_untouched", "empty_baseline")


class RegisterError(RuntimeError):
    """A missing input of the register stage; the message says which stage to run."""


def ensemble_files(params: Params) -> list[tuple[str, Path]]:
    """(artifact name, file) of every ensemble member, in the order ``submit`` uses."""
    from pneumoseg.inference import ensemble_members
    from pneumoseg.models import ModelError

    cfg = params.train
    try:
        members, tuned = params.ensemble.members, params.pseudo_label.folds
        return ensemble_members(cfg.models_dir, cfg.folds, params.oof.checkpoints, members, tuned)
    except ModelError as exc:
        raise RegisterError(str(exc)) from None


def lineage(params: Params) -> dict[str, Any]:
    """Scores, training runs and hashes that go into the version tags. Training run ids, data
    and params hashes come from the fold model files themselves (their ``meta``)."""
    import torch

    evaluation = read_json(params.evaluate.out, "run `pneumoseg evaluate` first")
    post = read_json(params.thresholds.out, "run `pneumoseg thresholds` first")
    runs: dict[str, str] = {}  # fold<k> (member main) or <member>-fold<k>
    metas: dict[str, dict[str, Any]] = {}
    data_hashes: set[str] = set()
    training_hashes: set[str] = set()
    for name, path in ensemble_files(params):
        meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
        member, _, index = name.rpartition("fold")  # <member>-fold<k>[_<j>] -> <member>-fold<k>
        key = f"{member}fold{index.split('_')[0]}"
        runs.setdefault(key, str(meta.get("mlflow_run_id") or ""))
        metas.setdefault(key, meta)
        data_hashes.add(str(meta.get("data_hash", "unknown")))
        training_hashes.add(str(meta.get("params_hash", "unknown")))
    own = stage_values(params, "register")  # submit.dialect as the package will write it:
    own["submit.dialect"] = output_dialect(params.submit.dialect, params.data.processed_dir)
    return {
        "model_digest": package_digest(
            ensemble_files(params),
            Path(params.thresholds.out),
            [own, {k: evaluation.get(k) for k in SCORES}],
        ),
        "evaluate": evaluation,
        "postprocess": post,
        "training_runs": runs,
        "training_metas": metas,
        "git": lineage_tags(),
        "data_hash": ";".join(sorted(data_hashes)),
        "params_hash": digest({"register": own, "training": sorted(training_hashes)}),
        "params": own,
    }


def fill_missing_runs(client: Any, params: Params, info: dict[str, Any]) -> None:
    """A fold trained while MLflow was down has no run id in its model file; once
    ``pneumoseg upload`` made its run, that run is found by its tags (stage, fold, params and
    data hash). A fold still without a run stops the registration, naming it."""
    from pneumoseg import registry

    runs = info["training_runs"]
    missing = [name for name, run_id in runs.items() if not run_id]
    if not missing:
        return
    with registry.mlflow_errors("register"):
        exp = client.get_experiment_by_name(experiment_name(params.mlflow, "stages"))
        for name in missing:
            meta = info["training_metas"][name]
            query = (
                f"tags.fold = '{meta.get('fold')}' and tags.params_hash = "
                f"'{meta.get('params_hash')}' and tags.data_hash = '{meta.get('data_hash')}' "
                "and attributes.status = 'FINISHED'"
            )
            found = client.search_runs([exp.experiment_id], query, max_results=1) if exp else []
            runs[name] = found[0].info.run_id if found else ""
    still = [name for name, run_id in runs.items() if not run_id]
    if still:
        raise RegisterError(
            f"no MLflow run records the training of {', '.join(still)} (trained while MLflow "
            "was down); `pneumoseg upload` completes it, then rerun register"
        )


def version_tags(params: Params, info: dict[str, Any], run_id: str) -> dict[str, str]:
    """Tags of the new model version (no patient data: scores, hashes and run ids only)."""
    ev, post = info["evaluate"], info["postprocess"]
    triplet = {
        k: post.get(k)
        for k in ("top_threshold", "bottom_threshold", "min_area", "min_component_area")
    }
    tags = {
        **info["git"],
        "data_hash": info["data_hash"],
        "params_hash": info["params_hash"],
        **{k: str(ev.get(k)) for k in SCORES},
        **interval_tags(ev, "kaggle_dice_untouched"),
        "training_run_ids": ",".join(info["training_runs"].values()),
        "folds": ",".join(str(k) for k in params.train.folds),
        "tta_hflip": str(params.oof.tta_hflip).lower(),
        "tta_scales": ",".join(map(str, params.oof.tta_scales)),
        "tta_gammas": ",".join(map(str, params.oof.tta_gammas)),
        "checkpoints": params.oof.checkpoints,
        "postprocess": json.dumps(triplet, sort_keys=True),
        "postprocess_run_id": str(post.get("mlflow_run_id") or ""),
        "register_run_id": run_id,
        "model_digest": info["model_digest"],
    }
    return tags | {f"training_run_{k}": rid for k, rid in info["training_runs"].items()}


def interval_tags(evaluation: dict[str, Any], key: str) -> dict[str, str]:
    """``<key>_ci95_low`` / ``_high`` of a score's bootstrap interval (none without one)."""
    ci = evaluation.get(f"{key}_ci95")
    if not isinstance(ci, list) or len(ci) != 2:
        return {}
    return {f"{key}_ci95_low": str(ci[0]), f"{key}_ci95_high": str(ci[1])}


def log_and_register(params: Params, info: dict[str, Any]) -> tuple[Any, str]:
    """Log the pyfunc in a ``register`` run and register it; (ModelVersion, logged model URI)."""
    import mlflow

    from pneumoseg import registry
    from pneumoseg.serving.package import log_pyfunc, model_description, version_description

    uri = tracking_uri(params.mlflow)
    tracker = Tracker(params.mlflow)
    log.info("register: packaging %d model files as one MLflow model", len(ensemble_files(params)))
    tags = {"stage": "register", "data_hash": info["data_hash"], "params_hash": info["params_hash"]}
    with store_lock(uri), registry.mlflow_errors("register"):
        if tracker.start("register", tags) is None:
            raise RegisterError("the MLflow tracking store cannot be reached (see above)")
        tracker.log_params(flatten(info["params"]))
        ev = info["evaluate"]
        tracker.log_metrics(
            {k: float(ev[k]) for k in (*SCORES, "dice_pos") if isinstance(ev.get(k), float)}, 0
        )
        with fluent_run(uri, tracker.run_id):
            model_info = log_pyfunc(
                ensemble_files(params),
                Path(params.thresholds.out),
                info["params"],
                info["params"]["submit.dialect"],
            )
            version = mlflow.register_model(
                model_info.model_uri,
                params.mlflow.registered_model,
                tags=version_tags(params, info, tracker.run_id),
            )
        name, commit = params.mlflow.registered_model, info["git"].get("git_commit", "unknown")
        scores = {k: ev[k] for k in SCORES if isinstance(ev.get(k), float)}
        about = version_description(info["params"], scores, info["data_hash"], commit)
        registry.describe(
            registry.open_client(params), name, version, model_description(name), about
        )
        tracker.end()
    return version, model_info.model_uri


def run(params: Params, progress: bool = True) -> dict[str, Any]:
    """CLI/DVC entry: register a new version, alias it ``challenger``, write ``registry.out``."""
    from pneumoseg import registry

    info = lineage(params)
    name = params.mlflow.registered_model
    client = registry.open_client(params)
    fill_missing_runs(client, params, info)
    # one registry change at a time: two registers (or a promote) cannot lose an alias update
    with registry.registry_lock(tracking_uri(params.mlflow)):
        with registry.mlflow_errors("register"):
            mv = registry.version_with_tag(client, name, "model_digest", info["model_digest"])
        if mv is not None:  # a rerun after a kill, or the same model again: no duplicate
            logged_uri = mv.source
            print(f"register: version {mv.version} already holds this exact model; no new one")
        else:
            with scoped_env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=None if progress else "false"):
                mv, logged_uri = log_and_register(params, info)
        with registry.mlflow_errors("register"):
            client.set_registered_model_alias(name, registry.CHALLENGER, mv.version)
        promoted, why = False, "registry.auto_promote is off"
        if params.registry.auto_promote:
            promoted, why = registry.auto_promote(client, name, str(mv.version))
        with registry.mlflow_errors("register"):
            aliases = registry.registered_model(client, name).aliases
    ev = info["evaluate"]
    champion = aliases.get(registry.CHAMPION)  # versions may come back as int
    record = {
        "name": name,
        "version": str(mv.version),
        "model_uri": f"models:/{name}/{mv.version}",
        "logged_model_uri": logged_uri,
        "run_id": mv.run_id or mv.tags.get("register_run_id"),
        "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
        "champion": str(champion) if champion is not None else None,
        **{k: ev.get(k) for k in SCORES},
        "git_commit": info["git"]["git_commit"],
        "data_hash": info["data_hash"],
        "params_hash": info["params_hash"],
        "training_run_ids": info["training_runs"],
    }
    out = Path(params.registry.out)
    write_json(out, record)

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"

    print(
        f"register: {name} version {mv.version} [{', '.join(record['aliases'])}] "
        f"kaggle_dice {fmt(record['kaggle_dice'])}, cross-fitted "
        f"{fmt(record['kaggle_dice_cross_fitted'])}; champion: "
        f"{record['champion'] or 'none'} ({'promoted: ' if promoted else ''}{why}) -> {out}"
    )
    return record
