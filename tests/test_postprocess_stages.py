"""oof -> thresholds -> evaluate -> submit -> score on the shared tiny pipeline."""

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
import yaml
from oof_maps import blended, deployed_maps, member_maps, oof_rows
from pipeline_helpers import Pipeline, cli, env, pneumoseg, set_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_pipeline: Pipeline) -> Path:
    """The shared tiny pipeline (read only)."""
    return tiny_pipeline.path


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_oof_uses_the_fold_that_did_not_train(trained: Path) -> None:
    ids = rows(trained / "oof/ids.csv")
    folds = {r["ImageId"]: r for r in rows(trained / "data/folds.csv")}
    trained_folds = {"0", "1"}  # of 3: the third fold's images are left out
    expected = sorted(i for i, r in folds.items() if r["fold"] in trained_folds)
    assert sorted(r["ImageId"] for r in ids) == expected  # every image of those folds once
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
    # the tiny pipeline's two members: the maps tuned are their mean with the chosen weights
    assert set(post["member_weights"]) == {"main", "tiny"}
    probs = deployed_maps(trained, post["member_weights"])
    oof = oof_rows(trained)
    masks, native = oof.masks, oof.native
    assert kaggle_dice_naive(probs, masks, t, native).mean() == pytest.approx(
        post["score"], abs=1e-12
    )
    assert post["n_trials"] == 20 and post["size"] == 64 and post["mlflow_run_id"]
    heatmap = trained / "plots/thresholds/exhaustive_heatmap.png"  # the grid, not thrown away
    assert heatmap.stat().st_size > 10_000

    def naive(triplet: dict) -> float:
        fields = {k: triplet[k] for k in Triplet.__dataclass_fields__}
        return float(kaggle_dice_naive(probs, masks, Triplet(**fields), native).mean())

    # the deployed triplet is the better of the study's and the grid's, each re-scored naively
    study, grid = naive(post["optuna"]), naive(post["exhaustive"])
    assert study == pytest.approx(post["optuna_best_score"], abs=1e-12)
    assert grid == pytest.approx(post["exhaustive"]["score"], abs=1e-12)
    assert post["score"] == pytest.approx(max(study, grid), abs=1e-12)
    assert post["selected"] == ("exhaustive" if grid > study else "optuna")
    # and no triplet of a coarse grid, scored naively, beats the exhaustive optimum
    levels = range(0, 256, 51)
    for area in post["exhaustive"]["areas"][:3]:
        for top in levels:
            for bottom in (b for b in levels if b <= top):
                coarse = {"top_threshold": top / 255, "bottom_threshold": bottom / 255}
                candidate = coarse | {"min_area": area, "min_component_area": 0, "cls_gate": None}
                assert naive(candidate) <= grid + 1e-12


def test_evaluate_reports_honest_numbers(trained: Path) -> None:
    from pneumoseg.postprocess import Triplet, TripletScorer, exhaustive_best, kaggle_dice_naive

    ev = json.loads((trained / "metrics/evaluate.json").read_text())
    post = json.loads((trained / "models/postprocess.json").read_text())
    assert ev["kaggle_dice"] == pytest.approx(post["score"], abs=1e-12)
    ids = rows(trained / "oof/ids.csv")
    manifest = {r["ImageId"]: r for r in rows(trained / "data/processed/manifest.csv")}
    oof = oof_rows(trained)
    masks, native, folds = oof.masks, oof.native, oof.folds
    maps = member_maps(trained)
    assert set(maps) == {"main", "tiny"}  # the tiny pipeline's two members
    areas = yaml.safe_load((trained / "params.yaml").read_text())["thresholds"]["exhaustive_areas"]
    step = yaml.safe_load((trained / "params.yaml").read_text())["ensemble"]["weight_step"]
    units = round(1 / step)
    candidates = [{"main": i / units, "tiny": 1 - i / units} for i in range(units + 1)]
    # cross-fitted: each fold scored naively on the members blended with the weights refitted
    # on the other fold, with the triplet tuned there
    dice = np.empty(len(ids))
    for k in (0, 1):
        tuned = ev["per_fold"][str(k)]["cross_fit_thresholds"]
        weights = tuned["member_weights"]
        others = folds != k

        def fitted(w: dict[str, float], others: np.ndarray = others) -> float:
            scorer = TripletScorer(blended(maps, w)[others], masks[others], native[others])
            return exhaustive_best(scorer, areas)[1]

        # the refitted weights reach the best exhaustive score of any grid point on the other
        # fold (ties between candidates may pick any of them)
        best = max(fitted(w) for w in candidates)
        assert fitted(weights) == pytest.approx(best, abs=1e-12)
        t = Triplet(**{f: tuned[f] for f in Triplet.__dataclass_fields__})
        held = folds == k
        probs = blended(maps, weights)
        dice[held] = kaggle_dice_naive(probs[held], masks[held], t, native[held])
        assert ev["per_fold"][str(k)]["kaggle_dice_cross_fitted"] == pytest.approx(
            dice[held].mean(), abs=1e-12
        )
    assert ev["kaggle_dice_cross_fitted"] == pytest.approx(dice.mean(), abs=1e-12)
    # inner selection and no applied study: no decision saw an OOF image but the in-sample
    # threshold search, so the untouched score is the cross-fitted one over every image
    assert ev["n_untouched"] == ev["n_images"] == len(ids)
    assert ev["kaggle_dice_untouched"] == pytest.approx(dice.mean(), abs=1e-12)
    assert ev["kaggle_dice_untouched_reason"] is None
    decisions = {d["decision"]: d for d in ev["provenance"]["decisions"]}
    assert decisions["checkpoint selection"]["oof_images_seen"] == 0
    assert decisions["threshold search"]["oof_images_seen"] == len(ids)
    assert decisions["threshold search"]["affects"] == ["kaggle_dice"]
    # each interval: the seeded percentile bootstrap of the mean, by hand, over that score's
    # own per-image values (in-sample: the deployed triplet on the deployed maps)
    t = Triplet(**{f: post[f] for f in Triplet.__dataclass_fields__})
    in_sample = kaggle_dice_naive(deployed_maps(trained, post["member_weights"]), masks, t, native)
    resamples = yaml.safe_load((trained / "params.yaml").read_text())["evaluate"]["bootstrap"]
    for key, values in (("kaggle_dice", in_sample), ("kaggle_dice_cross_fitted", dice),
                        ("kaggle_dice_untouched", dice)):  # fmt: skip
        drawn = np.random.default_rng(0).integers(0, len(values), size=(resamples, len(values)))
        means = values[drawn].mean(axis=1)
        by_hand = [np.percentile(means, 2.5), np.percentile(means, 97.5)]
        assert ev[f"{key}_ci95"] == pytest.approx(by_hand, abs=1e-12), key
    empty = ~masks.reshape(len(masks), -1).any(axis=1)
    assert ev["empty_baseline"] == pytest.approx(empty.mean())
    lost = [
        r
        for r, e in zip(ids, empty, strict=True)
        if e and manifest[r["ImageId"]]["has_mask"] == "1"
    ]
    assert ev["n_positive_lost"] == len(lost)
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
    # the Kaggle metric by hand: decode both csv files, dice per image, empty/empty = 1
    truth: dict[str, np.ndarray] = {}
    for r in rows(trained / "data/raw/demo/test-truth.csv"):
        image_id = r["ImageId"]
        h, w = int(manifest[image_id]["height"]), int(manifest[image_id]["width"])
        mask = rle_decode(r[" EncodedPixels"].strip(), h, w).astype(bool)
        truth[image_id] = truth.get(image_id, np.zeros((h, w), bool)) | mask
    scores = []
    for r in got:
        g = truth[r["ImageId"]]
        p = rle_decode(r["EncodedPixels"], *g.shape).astype(bool)
        total = p.sum() + g.sum()
        scores.append(1.0 if total == 0 else 2 * (p & g).sum() / total)
    assert result["kaggle_dice"] == pytest.approx(np.mean(scores), abs=1e-12)
    empty = np.mean([not g.any() for g in truth.values()])
    assert result["empty_baseline"] == pytest.approx(empty, abs=1e-12)


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

    from pneumoseg.studies.storage import open_storage

    (summary,) = optuna.get_all_study_summaries(storage=open_storage(str(journal)))
    done_before = summary.n_trials
    assert done_before >= 20
    cli("-q", "thresholds", "--trials", str(done_before + 15), cwd=project)
    post = json.loads((project / "models/postprocess.json").read_text())
    assert post["study_name"] == summary.study_name  # the same study, continued
    study = optuna.load_study(study_name=summary.study_name, storage=open_storage(str(journal)))
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.RUNNING) == 0  # the killed trial was failed
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states) >= done_before + 15 - 1


def test_oof_rows_stay_aligned_when_folds_are_not_sorted(trained: Path, tmp_path: Path) -> None:
    """train.folds [1, 0]: ids.csv, the maps and the masks follow one order."""
    import cv2

    project = tmp_path / "p"
    shutil.copytree(trained, project)
    set_params(project, {"train": {"folds": [1, 0]}})
    cli("-q", "oof", cwd=project)
    ids = rows(project / "oof/ids.csv")
    assert [r["fold"] for r in ids] == sorted((r["fold"] for r in ids), reverse=True)
    folds = {r["ImageId"]: r["fold"] for r in rows(project / "data/folds.csv")}
    assert all(folds[r["ImageId"]] == r["fold"] for r in ids)
    probs = np.load(project / "oof/probs.npy")
    masks = np.load(project / "oof/masks.npy")
    size = probs.shape[1]
    # each row holds its own image's ground truth and the same map as in the sorted run
    sorted_ids = [r["ImageId"] for r in rows(trained / "oof/ids.csv")]
    sorted_probs = np.load(trained / "oof/probs.npy")
    for k, r in enumerate(ids):
        png = cv2.imread(str(project / "data/processed/masks" / f"{r['ImageId']}.png"), 0)
        truth = cv2.resize(png, (size, size), interpolation=cv2.INTER_NEAREST) > 127
        assert np.array_equal(masks[k].astype(bool), truth), r["ImageId"]
        assert np.array_equal(probs[k], sorted_probs[sorted_ids.index(r["ImageId"])])


def test_oof_maps_are_at_the_size_the_models_predict(trained: Path) -> None:
    """oof.size null: thresholds are tuned at the size inference resizes from."""
    import torch

    meta = torch.load(trained / "models/folds/fold0/model.pt", weights_only=True)["meta"]
    probs = np.load(trained / "oof/probs.npy", mmap_mode="r")
    post = json.loads((trained / "models/postprocess.json").read_text())
    assert probs.shape[1] == probs.shape[2] == meta["size"] == post["size"]


def test_predicted_masks_have_native_resolution_edges(trained: Path) -> None:
    """Probabilities are resized to the native size before the triplet: a mask of a 200 px
    image from a 64 px model is not a blown-up 64 px mask (old behaviour: blocks of 3-4 px)."""
    import cv2
    from conftest import radiograph

    from pneumoseg.inference import Ensemble, predict_masks
    from pneumoseg.postprocess import PostProcess, Triplet

    ens = Ensemble([trained / "models/folds/fold0/model.pt"], tta_hflip=False)
    images = [radiograph(200, seed) for seed in range(4)]
    prepared = [cv2.resize(i, (64, 64), interpolation=cv2.INTER_AREA) for i in images]
    probs, _ = ens.predict(prepared)
    level = float(np.percentile(probs, 70))  # a triplet that marks ~30% of the pixels
    post = PostProcess(Triplet(top_threshold=level, min_area=0, bottom_threshold=level))
    items = [(f"i{k}", p, (200, 200), {}) for k, p in enumerate(prepared)]
    masks = [pred.mask for pred in predict_masks(ens, post, items)]
    for mask in masks:
        assert mask.shape == (200, 200) and 0 < mask.mean() < 1
        small = cv2.resize(mask, (64, 64), interpolation=cv2.INTER_NEAREST)
        blocks = cv2.resize(small, (200, 200), interpolation=cv2.INTER_NEAREST)
        assert not np.array_equal(mask, blocks)


def test_the_component_table_is_built_once_for_thresholds_and_evaluate(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scorer of the OOF maps (``oof_scorer``, as thresholds and evaluate open it) builds
    the component table on its first triplet with ``min_component_area`` and keeps it in the
    working folder; the next stage's scorer reads it back instead of building it again."""
    from pneumoseg.postprocess import Triplet, kaggle_dice_naive, oof_scorer
    from pneumoseg.postprocess import scorer as scorer_module

    oof = tmp_path / "oof"  # the main model's maps alone (the tiny pipeline's member left out)
    shutil.copytree(trained / "oof", oof, ignore=shutil.ignore_patterns("members"))
    monkeypatch.chdir(tmp_path)
    t = Triplet(0.5, 0, 0.2, min_component_area=300)
    first, _, _ = oof_scorer(oof, trained / "data/processed")
    expected = first.per_image(t)
    (cached,) = (tmp_path / ".pneumoseg/components").glob("*.npz")

    def no_second_build(*_: object) -> None:
        raise AssertionError("the component table was built twice")

    monkeypatch.setattr(scorer_module, "build_table", no_second_build)
    second, _, _ = oof_scorer(oof, trained / "data/processed")
    assert np.array_equal(second.per_image(t), expected)
    native = oof_rows(trained).native
    probs, masks = np.load(oof / "probs.npy"), np.load(oof / "masks.npy")
    assert np.array_equal(expected, kaggle_dice_naive(probs, masks, t, native))
    assert cached.is_file()
