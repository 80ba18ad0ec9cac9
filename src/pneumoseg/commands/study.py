"""``pneumoseg study run|show|apply NAME``: Optuna studies over training params.

A study is declared in ``params.yaml`` under ``studies.<NAME>`` (see
:class:`pneumoseg.params.StudyParams`). ``run`` is one worker (:mod:`pneumoseg.studies.runner`);
``show`` prints the trials, the best one and the importances (``--json`` for scripts);
``apply`` writes the best trial's values into ``params.yaml`` in place, with the record of what
chose them (``provenance.studies``), or with ``--exp`` runs ``dvc exp run -S ...``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from pneumoseg.params import Params
from pneumoseg.studies.config import load_study, mlflow_key, parse_duration, study_config
from pneumoseg.studies.report import best_values, format_summary, format_value, study_summary
from pneumoseg.studies.runner import StudyRunner
from pneumoseg.studies.yaml_edit import PROVENANCE_KEY, apply_to_file, hydra_value


def applied_record(params: Params, name: str, study: Any) -> list[dict[str, Any]]:
    """``provenance.studies`` after applying study ``name``: its entry (the best trial, the
    folds and images that scored the trials) replaces an earlier one of the same name."""
    best = study.best_trial
    seen = study.user_attrs.get("selection")  # studies from before it was recorded: held_out
    seen = seen or {"mode": "held_out", "folds": list(study_config(params, name).folds)}
    entry = {
        "name": name,
        "trial": best.number,
        "value": best.value,
        "folds": list(seen["folds"]),
        "selection": seen["mode"],
        "inner_fraction": seen.get("inner_fraction", params.train.selection.inner_fraction),
        "seed": seen.get("seed", params.train.seed),
    }
    others = [s.model_dump(mode="json") for s in params.provenance.studies if s.name != name]
    return [*others, entry]


def apply(
    params: Params,
    name: str,
    params_file: str | Path = "params.yaml",
    storage: str | None = None,
    exp: bool = False,
) -> dict[str, Any]:
    """Best trial -> ``params.yaml`` (in place) or -> ``dvc exp run -S ...`` (``exp``)."""
    study = load_study(params, name, storage)
    values = best_values(study, name)
    best = study.best_trial
    applied = applied_record(params, name, study)
    if exp:
        cmd = ["dvc", "exp", "run"]
        for key, value in values.items():
            cmd += ["-S", f"{mlflow_key(key)}={json.dumps(value)}"]
        cmd += ["-S", f"{PROVENANCE_KEY}={hydra_value(applied)}"]
        print(" ".join(cmd))
        proc = subprocess.run(cmd, check=False)
        if proc.returncode:
            raise RuntimeError(f"study {name}: `dvc exp run` exited with {proc.returncode}")
        return {"trial": best.number, "value": best.value, "values": values, "exp": True}
    changes = apply_to_file(Path(params_file), values | {PROVENANCE_KEY: applied})
    print(f"{params_file}: best trial {best.number} of study {name} (value {best.value:.4f})")
    for key, old, new in changes:
        print(f"  {key}: {format_value(old)} -> {format_value(new)}")
    print("next: git diff params.yaml && dvc repro")
    return {"trial": best.number, "value": best.value, "values": values, "exp": False}


def run(
    params: Params,
    action: str,
    name: str,
    trials: int | None = None,
    timeout: str | None = None,
    storage: str | None = None,
    json_out: bool = False,
    exp: bool = False,
    params_file: str = "params.yaml",
    progress: bool = True,
) -> Any:
    """CLI entry of ``pneumoseg study ACTION NAME``."""
    if action == "run":
        runner = StudyRunner(params, name, storage, progress)
        return runner.run(trials, parse_duration(timeout))
    if action == "show":
        summary = study_summary(load_study(params, name, storage))
        print(json.dumps(summary, indent=2) if json_out else format_summary(summary), end="")
        if json_out:
            print()
        return summary
    if action == "apply":
        return apply(params, name, params_file, storage, exp)
    raise ValueError(f"study: unknown action {action!r} (run, show, apply)")
