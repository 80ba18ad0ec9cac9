"""Stage ``register``: package the fold ensemble + flip TTA + tuned post-processing as ONE MLflow
model and register it as a new version of ``mlflow.registered_model``.

The model is a pyfunc defined as code (:mod:`pneumoseg.serving.pyfunc_model`, nothing pickled):
the fold model files, ``postprocess.json`` and the resolved params are its artifacts, the
``pneumoseg`` package ships as ``code_paths``, requirements are pinned to the installed versions.
The new version gets the alias ``challenger`` and tags for lineage (git commit, data hash,
params hash, training run ids) and scores (``kaggle_dice``, ``kaggle_dice_cross_fitted``);
``champion`` moves only by promotion (or ``registry.auto_promote``). ``registry.out`` records
the registry entry so ``dvc.lock`` points at it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pneumoseg.params import Params, digest, flatten, nest, stage_values
from pneumoseg.redact import redact
from pneumoseg.tracking import (
    MAX_VALUE,
    ensure_experiment,
    lineage_tags,
    store_lock,
    tracking_uri,
)

log = logging.getLogger(__name__)

# What the served model imports (pinned to the installed versions).
SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "segmentation-models-pytorch",
    "timm",
    "numpy",
    "pandas",
    "opencv-python-headless",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pillow",
    "pyyaml",
    "pydantic",
    "tqdm",
)


class RegisterError(RuntimeError):
    """A missing input of the register stage; the message says which stage to run."""


def pinned_requirements(names: tuple[str, ...] = SERVING_REQUIREMENTS) -> list[str]:
    """``name==version`` of each installed distribution (local version labels dropped)."""
    pins = []
    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            log.warning("register: %s is not installed; left out of the requirements", name)
            continue
        pins.append(f"{name}=={version.split('+')[0]}")
    return pins


def _read_json(path: str | Path, hint: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RegisterError(f"{path}: missing ({hint})")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise RegisterError(f"{path}: not valid JSON ({hint})") from None


def ensemble_files(params: Params) -> list[tuple[str, Path]]:
    """(artifact name, file) of every ensemble member, in the order ``submit`` uses."""
    from pneumoseg.inference import fold_model_files
    from pneumoseg.models import ModelError

    out = []
    for k in params.train.folds:
        try:
            files = fold_model_files(params.train.models_dir, k, params.oof.checkpoints)
        except ModelError as exc:
            raise RegisterError(str(exc)) from None
        for j, path in enumerate(files):
            if not path.is_file():
                raise RegisterError(f"{path}: missing (train fold {k} first)")
            out.append((f"fold{k}" if len(files) == 1 else f"fold{k}_{j}", path))
    return out


def lineage(params: Params) -> dict[str, Any]:
    """Scores, training runs and hashes that go into the version tags. Training run ids, data
    and params hashes come from the fold model files themselves (their ``meta``)."""
    import torch

    evaluation = _read_json(params.evaluate.out, "run `pneumoseg evaluate` first")
    post = _read_json(params.thresholds.out, "run `pneumoseg thresholds` first")
    runs: dict[int, str] = {}
    data_hashes: set[str] = set()
    training_hashes: set[str] = set()
    for name, path in ensemble_files(params):
        meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
        fold = int(meta.get("fold", name.removeprefix("fold").split("_")[0]))
        runs.setdefault(fold, str(meta.get("mlflow_run_id") or ""))
        data_hashes.add(str(meta.get("data_hash", "unknown")))
        training_hashes.add(str(meta.get("params_hash", "unknown")))
    own = stage_values(params, "register")
    return {
        "evaluate": evaluation,
        "postprocess": post,
        "training_runs": runs,
        "git": lineage_tags(),
        "data_hash": ";".join(sorted(data_hashes)),
        "params_hash": digest({"register": own, "training": sorted(training_hashes)}),
        "params": own,
    }


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
        "kaggle_dice": str(ev.get("kaggle_dice")),
        "kaggle_dice_cross_fitted": str(ev.get("kaggle_dice_cross_fitted")),
        "kaggle_dice_untouched": str(ev.get("kaggle_dice_untouched")),
        "empty_baseline": str(ev.get("empty_baseline")),
        "training_run_ids": ",".join(info["training_runs"].values()),
        "folds": ",".join(str(k) for k in params.train.folds),
        "tta_hflip": str(params.oof.tta_hflip).lower(),
        "checkpoints": params.oof.checkpoints,
        "postprocess": json.dumps(triplet, sort_keys=True),
        "postprocess_run_id": str(post.get("mlflow_run_id") or ""),
        "register_run_id": run_id,
    }
    for k, rid in info["training_runs"].items():
        tags[f"training_run_fold{k}"] = rid
    return tags


def log_and_register(params: Params, info: dict[str, Any], uri: str) -> tuple[Any, Any]:
    """Log the pyfunc in a ``register`` run and register it; returns (ModelInfo, ModelVersion)."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    import pneumoseg
    from pneumoseg import registry, serving

    name = params.mlflow.registered_model
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    members = ensemble_files(params)
    package = Path(pneumoseg.__file__).resolve().parent
    code_file = Path(serving.__file__).resolve().parent / "pyfunc_model.py"
    ev = info["evaluate"]
    metrics = {
        k: float(ev[k])
        for k in (
            "kaggle_dice",
            "kaggle_dice_cross_fitted",
            "kaggle_dice_untouched",
            "empty_baseline",
            "dice_pos",
        )
        if isinstance(ev.get(k), (int, float))
    }
    with (
        tempfile.TemporaryDirectory(prefix="pneumoseg-register-") as tmp,
        registry.using_tracking_uri(uri),
        registry.mlflow_errors("register"),
        store_lock(uri),
    ):
        # the settings the served model needs (decode size, CLAHE, TTA, RLE dialect), nested
        # like params.yaml
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(redact(nest(info["params"])), sort_keys=False))
        artifacts = {n: str(p.resolve()) for n, p in members}
        artifacts[serving.PARAMS_ARTIFACT] = str(params_file)
        artifacts[serving.POSTPROCESS_ARTIFACT] = str(Path(params.thresholds.out).resolve())
        run_tags = {
            "stage": "register",
            **info["git"],
            "data_hash": info["data_hash"],
            "params_hash": info["params_hash"],
        }
        exp_id = ensure_experiment(client, params.mlflow, uri)
        with mlflow.start_run(experiment_id=exp_id, run_name="register", tags=run_tags) as run:
            flat = redact(flatten(info["params"]))
            items = [Param(k, str(v)[:MAX_VALUE]) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                client.log_batch(run.info.run_id, params=items[i : i + 100])
            mlflow.log_metrics(metrics)
            model_info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code_file),
                artifacts=artifacts,
                model_config={"format": serving.FORMAT, "models": [n for n, _ in members]},
                code_paths=[str(package)],
                signature=serving.model_signature(params.submit.dialect),
                input_example=serving.input_example(),
                pip_requirements=pinned_requirements(),
                metadata={"pneumoseg_format": serving.FORMAT},
            )
            tags = version_tags(params, info, run.info.run_id)
            version = mlflow.register_model(model_info.model_uri, name, tags=tags)
    return model_info, version


def run(params: Params, progress: bool = True) -> dict[str, Any]:
    """CLI/DVC entry: register a new version, alias it ``challenger``, write ``registry.out``."""
    from mlflow.tracking import MlflowClient

    from pneumoseg import registry

    if not progress:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(params.mlflow)
    info = lineage(params)
    name = params.mlflow.registered_model
    model_info, mv = log_and_register(params, info, uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
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
        "logged_model_uri": model_info.model_uri,
        "run_id": mv.run_id or model_info.run_id,
        "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
        "champion": str(champion) if champion is not None else None,
        "kaggle_dice": ev.get("kaggle_dice"),
        "kaggle_dice_cross_fitted": ev.get("kaggle_dice_cross_fitted"),
        "kaggle_dice_untouched": ev.get("kaggle_dice_untouched"),
        "git_commit": info["git"]["git_commit"],
        "data_hash": info["data_hash"],
        "params_hash": info["params_hash"],
        "training_run_ids": info["training_runs"],
    }
    out = Path(params.registry.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"

    print(
        f"register: {name} version {mv.version} [{', '.join(record['aliases'])}] "
        f"kaggle_dice {fmt(record['kaggle_dice'])}, cross-fitted "
        f"{fmt(record['kaggle_dice_cross_fitted'])}; champion: "
        f"{record['champion'] or 'none'} ({'promoted: ' if promoted else ''}{why}) -> {out}"
    )
    return record
