"""A study's definition turned into Optuna objects: its config, sampler, pruner and suggested
values, and the params of one trial (the pipeline's, with the study's budget and values)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from pneumoseg.params import (
    Distribution,
    Params,
    ParamsError,
    StudyParams,
    format_validation_error,
    set_path,
)
from pneumoseg.redact import redact_text
from pneumoseg.studies.storage import open_storage, resolve_storage


def study_config(params: Params, name: str) -> StudyParams:
    """The ``studies.<name>`` section, or a one-line error listing the defined studies."""
    if name not in params.studies:
        known = ", ".join(sorted(params.studies)) or "none"
        raise ValueError(f"params.yaml: studies.{name}: no such study (defined: {known})")
    return params.studies[name]


def mlflow_key(path: str) -> str:
    """``train.parts[0].lr`` -> ``train.parts.0.lr`` (MLflow keys and ``dvc exp run -S``)."""
    return re.sub(r"\[(\d+)\]", r".\1", path)


def parse_duration(text: str | float | None) -> float | None:
    """Seconds from ``3600``, ``90s``, ``30m``, ``2h`` or ``1.5h`` (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise ValueError(f"--timeout {text!r}: use seconds or a number with s, m or h (e.g. 2h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def space_digest(cfg: StudyParams) -> str:
    """What makes trials comparable: space, budget, folds, metric and direction."""
    keys = {"space", "parts", "budget", "folds", "metric", "direction"}
    blob = cfg.model_dump(mode="json", include=keys)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------ sampling
def suggest(trial: Any, path: str, dist: Distribution) -> Any:
    """One value of ``path`` from the trial (the Optuna param is named by the path)."""
    if dist.type == "categorical":
        return trial.suggest_categorical(path, dist.choices)
    assert dist.low is not None and dist.high is not None
    if dist.type == "int":
        step = int(dist.step or 1)
        return trial.suggest_int(path, int(dist.low), int(dist.high), step=step, log=dist.log)
    return trial.suggest_float(path, dist.low, dist.high, step=dist.step, log=dist.log)


def make_sampler(cfg: StudyParams, seed: int) -> Any:
    """TPE (multivariate), random, grid (every combination) or CMA-ES, seeded."""
    import optuna

    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if cfg.sampler == "grid":
        grid: dict[str, list[Any]] = {}
        for path, d in cfg.space.items():
            if d.type == "categorical":
                grid[path] = list(d.choices or [])
            elif d.type == "int":
                grid[path] = list(range(int(d.low or 0), int(d.high or 0) + 1, int(d.step or 1)))
            elif d.step is not None:
                n = int(math.floor(((d.high or 0) - (d.low or 0)) / d.step + 1e-9))
                grid[path] = [round((d.low or 0) + i * d.step, 10) for i in range(n + 1)]
            else:
                raise ValueError(f"studies: sampler grid: {path} needs a step or choices")
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def make_pruner(cfg: StudyParams) -> Any:
    import optuna

    p = cfg.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs
        )
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def trial_selection(params: Params) -> dict[str, Any]:
    """The images that score a study's trials: the pipeline's ``train.selection``, except that
    a pipeline without one (``mode: none``) gets the inner split (a trial needs a score)."""
    sel = params.train.selection
    return {
        "mode": "inner" if sel.mode == "none" else sel.mode,
        "inner_fraction": sel.inner_fraction,
    }


def trial_params(
    params: Params, cfg: StudyParams, values: dict[str, Any], trial_dir: Path
) -> Params:
    """The params of one trial: ``params`` (its first ``cfg.parts`` parts) + the study budget +
    the trial's values, training only ``cfg.folds`` and writing into ``trial_dir`` (never the
    pipeline's outputs)."""
    # a trial trains the train section only (ensemble members are not searched)
    raw = params.model_dump(mode="json", exclude={"studies", "ensemble"}) | {"studies": {}}
    raw["train"]["parts"] = raw["train"]["parts"][: cfg.parts]
    for path, value in [*cfg.budget.items(), *values.items()]:
        set_path(raw, path, value)
    raw["train"]["folds"] = list(cfg.folds)
    raw["train"]["selection"] = trial_selection(params)
    raw["train"]["observe_heldout_every"] = 0  # a trial scores on its inner split only
    for key in ("models_dir", "work_dir", "metrics_dir", "plots_dir"):
        raw["train"][key] = str(trial_dir / key.removesuffix("_dir"))
    from pydantic import ValidationError

    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        first = format_validation_error(err, "trial params").splitlines()[0]
        raise ParamsError(first) from None


# ------------------------------------------------------------------------------- the run
def load_study(params: Params, name: str, storage: str | None = None) -> Any:
    """The stored study (a one-line error when it does not exist yet)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = study_config(params, name)
    url = resolve_storage(storage or cfg.storage)
    if "://" not in url and not Path(url).exists():
        raise ValueError(f"study {name}: no Optuna storage at {url}; run `pneumoseg study run`")
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise ValueError(
            f"study {name}: not found in {redact_text(url)}; run `pneumoseg study run {name}`"
        ) from None
