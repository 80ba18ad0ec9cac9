"""One MLflow row per pipeline result (stage ``result``), on a real DVC pipeline and store.

`dvc repro`, then two DVC experiments queued and run at once (one retrains, one changes only
threshold keys): the query the MLflow UI makes for its default runs table returns exactly three
rows, each with every declared param (the reused training's params on the threshold-only row,
read from dvc.lock), the same numbers as `dvc exp show`, and links that resolve to existing
runs and the registered model version; every stage run is in the repo's store (not in the
experiments' temporary copies under .dvc/tmp/exps, the same kind of copy ``dvc exp run
--temp`` makes), tagged with its experiment. Then the retrained experiment is applied and
tagged, and the baseline's git tag restores the baseline's models byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pipeline_helpers import DvcProject, dvc, git_commit, run, run_queue
from test_experiments import experiments, run_ids

pytestmark = pytest.mark.slow


def shown_results(project: Path) -> dict[str, dict[str, Any]]:
    """`dvc exp show --json`: experiment name (the baseline: "baseline") -> result.json."""
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    out: dict[str, dict[str, Any]] = {}
    for baseline in shown:
        data = (baseline.get("data") or {}).get("metrics") or {}
        if "metrics/result.json" in data:
            out["baseline"] = data["metrics/result.json"]["data"]
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                metrics = ((rev.get("data") or {}).get("metrics")) or {}
                out[rev["name"]] = metrics["metrics/result.json"]["data"]
    return out


def ui_rows(client: Any, experiment: str = "pneumoseg") -> list[Any]:
    """The runs the MLflow UI's default runs table shows for ``experiment`` (active runs, no
    filter, newest first; the UI nests child runs under their parent: none here)."""
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], "", ViewType.ACTIVE_ONLY, order_by=["attributes.start_time DESC"]
    )
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def check_row(client: Any, row: Any, shown: dict[str, Any]) -> None:
    """A row carries the headline of `dvc exp show`, the training params and live links."""
    metrics = row.data.metrics
    numbers = {k: v for k, v in shown.items() if k != "mlflow_run_id"}
    assert shown["mlflow_run_id"] == row.info.run_id
    assert {k: metrics[k] for k in numbers} == pytest.approx(numbers, abs=1e-12)
    for key in ("kaggle_dice_untouched", "kaggle_dice_untouched_ci95_low", "dice_pos",
                "kaggle_dice_cross_fitted", "kaggle_dice_in_sample", "empty_baseline",
                "n_positive", "kaggle_dice_untouched_ci95_high"):  # fmt: skip
        assert key in numbers, key
    params = row.data.params
    for key in ("train.seed", "train.model.encoder", "train.parts.0.lr", "thresholds.seed",
                "split.n_folds", "oof.tta_hflip", "evaluate.bootstrap"):  # fmt: skip
        assert key in params, key
    tags = row.data.tags
    assert tags["params_source"] == "dvc.lock" and "links_missing" not in tags
    assert tags["git_commit"] and tags["data_hash"] and tags["params_hash"]
    links = {k: v for k, v in tags.items() if k.startswith("run.")}
    assert {"run.train-fold0", "run.train-fold1", "run.thresholds", "run.evaluate",
            "run.register"} <= set(links)  # fmt: skip
    for name, run_id in links.items():
        run = client.get_run(run_id)  # exists (raises if not)
        stage = name.removeprefix("run.").split("-")[0]
        assert run.data.tags["stage"] == stage, name
        assert run_id in tags["mlflow.note.content"]  # the description links it too
    version = client.get_model_version(tags["registered_model"], tags["registered_model_version"])
    assert version.tags["pipeline_run_id"] in {r.info.run_id for r in ui_rows(client)}
    for key in ("train_loss", "observed_heldout_kaggle_dice"):  # the fold curves, per epoch
        history = client.get_metric_history(row.info.run_id, f"train-fold0/{key}")
        assert len(history) >= 1 and all(m.step >= 1 for m in history), key
    assert tags["optuna_study"].startswith("thresholds-")


def test_one_row_per_pipeline_result(dvc_project: DvcProject, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = dvc_project.copy(tmp_path / "p")
    # two experiments queued and run at once, on the one sqlite store of the repo (each in a
    # temporary copy under .dvc/tmp/exps): one retrains, one changes only threshold keys
    dvc("exp", "run", "--queue", "-n", "retrained", "-S", "train.seed=7", cwd=project)
    dvc("exp", "run", "--queue", "-n", "thresholds-only", "-S", "thresholds.seed=5", cwd=project)
    run_queue(project, ("retrained", "thresholds-only"))

    store = f"sqlite:///{project}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    rows = ui_rows(client)
    assert len(rows) == 3  # one per pipeline result: baseline, retrained, thresholds-only
    by_name = {r.data.tags.get("dvc_exp_name", "baseline"): r for r in rows}
    assert set(by_name) == {"baseline", "retrained", "thresholds-only"}
    shown = shown_results(project)
    for name, row in by_name.items():
        check_row(client, row, shown[name])
    base, retrained, only = (by_name[n] for n in ("baseline", "retrained", "thresholds-only"))
    assert retrained.data.params["train.seed"] == "7"
    assert retrained.data.tags["run.train-fold0"] != base.data.tags["run.train-fold0"]
    # the threshold-only experiment reused the baseline's training: its params and runs
    assert only.data.params["train.seed"] == base.data.params["train.seed"] == "42"
    assert only.data.params["thresholds.seed"] == "5"
    assert only.data.tags["run.train-fold0"] == base.data.tags["run.train-fold0"]
    assert only.data.tags["run.thresholds"] != base.data.tags["run.thresholds"]
    assert only.data.tags["optuna_study"] != base.data.tags["optuna_study"]
    # the stage runs are in the stages experiment, not in the rows compared
    stages = client.get_experiment_by_name("pneumoseg-stages")
    assert client.get_run(only.data.tags["run.evaluate"]).info.experiment_id == (
        stages.experiment_id
    )
    # the per-image table of each evaluation, sortable in the UI (MLflow's table format)
    local = client.download_artifacts(only.info.run_id, "per_image.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    per_image = (project / "metrics/per_image.csv").read_text().splitlines()
    assert len(table["data"]) == len(per_image) - 1
    assert {"ImageId", "fold", "has_mask", "dice_cross_fitted", "pred_pixels", "max_prob",
            "seen_by"} <= set(table["columns"])  # fmt: skip
    # the row names its Optuna study: in the repo's storage, each trial naming its MLflow run,
    # and optuna-dashboard reads that storage
    import optuna
    from test_study import dashboard_get

    from pneumoseg.studies.storage import open_storage

    journal = project / "optuna/journal.log"
    name = only.data.tags["optuna_study"]
    study = optuna.load_study(study_name=name, storage=open_storage(str(journal)))
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {
        only.data.tags["run.thresholds"]
    }
    summaries = dashboard_get(journal, "/api/studies")["study_summaries"]
    assert name in [s["study_name"] for s in summaries]
    # every stage run of each experiment is in the repo's store, tagged with the experiment
    shown_all = experiments(project)
    base_ids = run_ids(shown_all["workspace"])
    for name in ("retrained", "thresholds-only"):
        for path, run_id in run_ids(shown_all[name]).items():
            stage_run = client.get_run(run_id)  # in the repo's store (raises if not)
            if run_id != base_ids[path]:
                assert stage_run.data.tags["dvc_exp_name"] == name, (path, stage_run.data.tags)
                assert stage_run.data.tags["dvc_exp_baseline_rev"]
        registered = shown_all[name]["metrics/registered.json"]
        version = client.get_model_version(registered["name"], registered["version"])
        assert version.tags["dvc_exp_name"] == name
    assert not list((project / ".dvc/tmp/exps").rglob("mlflow.db"))  # no store in a copy
    restore_by_git_tag(project)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def restore_by_git_tag(project: Path) -> None:
    """The retrained experiment applied and committed with a git tag; then
    `git checkout base -- dvc.lock params.yaml metrics && dvc checkout` restores the baseline's
    models/ byte for byte, and its registry entry (metrics/registered.json: version 1)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["register"]
    assert [o["path"] for o in lock["outs"]] == ["metrics/registered.json"]  # -> registry entry
    models_base = tree(project / "models")
    record_base = (project / "metrics/registered.json").read_bytes()
    assert json.loads(record_base)["version"] == "1"
    dvc("exp", "apply", "retrained", cwd=project)
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["seed"] == 7
    assert json.loads((project / "metrics/registered.json").read_text())["version"] != "1"
    assert tree(project / "models") != models_base
    git_commit(project, "the retrained experiment", tag="retrained")
    git = ("git", "-c", "advice.detachedHead=false")
    run([*git, "checkout", "base", "--", "dvc.lock", "params.yaml", "metrics"], cwd=project)
    dvc("checkout", cwd=project)
    assert tree(project / "models") == models_base  # byte for byte
    assert (project / "metrics/registered.json").read_bytes() == record_base  # -> version 1
