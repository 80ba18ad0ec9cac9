"""oof -> thresholds -> evaluate -> submit -> score on a tiny trained demo project."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import env, pneumoseg, prepared_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = prepared_data(
        tmp_path_factory.mktemp("post") / "p",
        {"thresholds": {"trials": 30}, "evaluate": {"bootstrap": 200}, "oof": {"size": 64}},
    )
    pneumoseg("-q", "train", cwd=project)
    pneumoseg("-q", "oof", cwd=project)
    pneumoseg("-q", "thresholds", cwd=project)
    pneumoseg("-q", "evaluate", cwd=project)
    pneumoseg("-q", "submit", cwd=project)
    return project


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_oof_uses_the_fold_that_did_not_train(trained: Path) -> None:
    ids = rows(trained / "oof/ids.csv")
    folds = {r["ImageId"]: r for r in rows(trained / "data/folds.csv")}
    assert sorted(r["ImageId"] for r in ids) == sorted(folds)  # every training image once
    assert all(r["fold"] == folds[r["ImageId"]]["fold"] for r in ids)
    probs = np.load(trained / "oof/probs.npy", mmap_mode="r")
    masks = np.load(trained / "oof/masks.npy", mmap_mode="r")
    assert probs.dtype == np.uint8 and probs.shape == (len(ids), 64, 64)
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    has = np.array([int(folds[r["ImageId"]]["has_mask"]) for r in ids])
    assert np.array_equal(masks.reshape(len(ids), -1).any(axis=1), has.astype(bool))


def test_postprocess_score_equals_naive_recomputation(trained: Path) -> None:
    from pneumoseg.postprocess import Triplet, kaggle_dice_naive

    post = json.loads((trained / "models/postprocess.json").read_text())
    t = Triplet(**{k: post[k] for k in Triplet.__dataclass_fields__})
    probs = np.load(trained / "oof/probs.npy")
    masks = np.load(trained / "oof/masks.npy")
    manifest = {r["ImageId"]: r for r in rows(trained / "data/processed/manifest.csv")}
    native = np.array([int(manifest[r["ImageId"]]["width"]) for r in rows(trained / "oof/ids.csv")])
    assert kaggle_dice_naive(probs, masks, t, native).mean() == pytest.approx(
        post["score"], abs=1e-12
    )
    assert post["n_trials"] == 30 and post["size"] == 64 and post["mlflow_run_id"]
    assert post["exhaustive"]["score"] >= post["empty_baseline"]
    assert post["score"] >= post["optuna_best_score"]


def test_evaluate_reports_honest_numbers(trained: Path) -> None:
    ev = json.loads((trained / "metrics/evaluate.json").read_text())
    post = json.loads((trained / "models/postprocess.json").read_text())
    assert ev["kaggle_dice"] == pytest.approx(post["score"], abs=1e-12)
    assert ev["kaggle_dice_cross_fitted"] is not None
    lo, hi = ev["kaggle_dice_ci95"]
    assert lo <= ev["kaggle_dice"] <= hi
    masks = np.load(trained / "oof/masks.npy")
    empty = ~masks.reshape(len(masks), -1).any(axis=1)
    assert ev["empty_baseline"] == pytest.approx(empty.mean())
    assert set(ev["per_fold"]) == {"0", "1"}
    for name in ("score_vs_bottom.png", "dice_histogram.png"):
        assert (trained / "plots/evaluate" / name).stat().st_size > 1000


def test_submission_format_and_score(trained: Path) -> None:
    from pneumoseg.rle import rle_decode

    sub = trained / "submission/submission.csv"
    assert sub.read_text().splitlines()[0] == "ImageId,EncodedPixels"
    got = rows(sub)
    manifest = {r["ImageId"]: r for r in rows(trained / "data/processed/manifest.csv")}
    test_ids = sorted(i for i, r in manifest.items() if r["split"] == "test")
    sample = [r["ImageId"] for r in rows(trained / "data/raw/demo/sample_submission.csv")]
    assert [r["ImageId"] for r in got] == sample and sorted(sample) == test_ids
    for r in got:
        h, w = int(manifest[r["ImageId"]]["height"]), int(manifest[r["ImageId"]]["width"])
        rle_decode(r["EncodedPixels"], h, w)  # valid at the native size
    proc = pneumoseg(
        "score",
        "--submission",
        str(sub),
        "--truth",
        "data/raw/demo/test-truth.csv",
        "--json",
        cwd=trained,
    )
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["n_images"] == len(test_ids) and result["missing"] == 0
    assert 0.0 <= result["kaggle_dice"] <= 1.0


def test_killed_threshold_study_continues(trained: Path, tmp_path: Path) -> None:
    project = tmp_path / "p"
    shutil.copytree(trained, project)
    shutil.rmtree(project / "optuna")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumoseg", "-q", "thresholds", "--trials", "100000"],
        cwd=project,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    journal = project / "optuna/journal.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 200:
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    import optuna

    from pneumoseg.studies import open_storage

    (summary,) = optuna.get_all_study_summaries(storage=open_storage(str(journal)))
    done_before = summary.n_trials
    assert done_before >= 20
    pneumoseg("-q", "thresholds", "--trials", str(done_before + 15), cwd=project)
    post = json.loads((project / "models/postprocess.json").read_text())
    assert post["study_name"] == summary.study_name  # the same study, continued
    study = optuna.load_study(study_name=summary.study_name, storage=open_storage(str(journal)))
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.RUNNING) == 0  # the killed trial was failed
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states) >= done_before + 15 - 1
