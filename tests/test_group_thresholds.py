"""Conditional thresholds (``thresholds.group_by``): searched per group, applied per group."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from oof_maps import deployed_maps, oof_rows
from pipeline_helpers import Pipeline, in_process, set_params

pytestmark = pytest.mark.slow

GROUPED = {
    "thresholds": {"group_by": "view_position", "trials": 20},
    "evaluate": {"bootstrap": 50, "gallery": 2},
}


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def project(tiny_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny pipeline's OOF maps, thresholds searched per view position."""
    path = tiny_pipeline.copy(tmp_path_factory.mktemp("grouped") / "p")
    set_params(path, GROUPED)
    in_process("-q", "thresholds", cwd=path)
    return path


def oof_arrays(project: Path, post: dict) -> tuple[np.ndarray, ...]:
    """The maps thresholds tuned on (the members blended with the weights it chose), masks,
    native widths and view positions, in OOF row order."""
    oof = oof_rows(project)
    maps = deployed_maps(project, post.get("member_weights"))
    return maps, oof.masks, oof.native, oof.field("view_position")


def naive_grouped(project: Path, post: dict) -> float:
    """Mean Kaggle dice with each image's group triplet, by re-thresholding every map."""
    from pneumoseg.postprocess import Triplet, kaggle_dice_naive

    probs, masks, native, views = oof_arrays(project, post)
    dice = np.empty(len(probs))
    for g, t in post["groups"].items():
        idx = np.flatnonzero(views == g)
        dice[idx] = kaggle_dice_naive(probs[idx], masks[idx], Triplet(**t), native[idx])
    return float(dice.mean())


def test_one_triplet_per_group_and_exact_score(project: Path) -> None:
    post = json.loads((project / "models/postprocess.json").read_text())
    assert set(post["member_weights"]) == {"main", "tiny"}  # the tiny pipeline's two members
    probs, masks, native, views = oof_arrays(project, post)
    assert post["group_by"] == "view_position"
    assert set(post["groups"]) == set(views.tolist()) == {"AP", "PA"}
    assert post["group_sizes"] == {g: int((views == g).sum()) for g in ("AP", "PA")}
    for t in post["groups"].values():
        assert {"top_threshold", "min_area", "bottom_threshold"} <= set(t)
    assert post["score"] == pytest.approx(naive_grouped(project, post), abs=1e-12)
    # per group, the better of the study's and the grid's triplet, both re-scored naively
    from pneumoseg.postprocess import Triplet, kaggle_dice_naive

    for g, found in post["group_candidates"].items():
        idx = np.flatnonzero(views == g)

        def naive(t: dict, idx: np.ndarray = idx) -> float:
            return float(
                kaggle_dice_naive(probs[idx], masks[idx], Triplet(**t), native[idx]).mean()
            )

        study, grid = naive(found["optuna"]), naive(found["exhaustive"])
        assert naive(post["groups"][g]) == pytest.approx(max(study, grid), abs=1e-12)
        assert post["group_selected"][g] == ("exhaustive" if grid > study else "optuna")


def test_evaluate_and_submit_apply_each_groups_triplet(project: Path) -> None:
    from pneumoseg.postprocess import Triplet

    # Make the groups' triplets maximally different: AP predicts nothing, PA every pixel > 0.
    post_path = project / "models/postprocess.json"
    post = json.loads(post_path.read_text())
    post["groups"] = {
        "AP": asdict(Triplet(top_threshold=1.0, min_area=0, bottom_threshold=1.0)),
        "PA": asdict(Triplet(top_threshold=0.0, min_area=0, bottom_threshold=0.0)),
    }
    post_path.write_text(json.dumps(post))
    in_process("-q", "evaluate", cwd=project)
    in_process("-q", "submit", cwd=project)

    ev = json.loads((project / "metrics/evaluate.json").read_text())
    assert ev["group_by"] == "view_position"
    assert ev["kaggle_dice"] == pytest.approx(naive_grouped(project, post), abs=1e-12)
    ids = rows(project / "oof/ids.csv")
    views_of = {
        r["ImageId"]: r["view_position"] for r in rows(project / "data/processed/manifest.csv")
    }
    for k in ("0", "1"):  # cross-fitting tunes one triplet per group of the other fold
        cf = ev["per_fold"][k]["cross_fit_thresholds"]["groups"]
        assert set(cf) == {views_of[r["ImageId"]] for r in ids if r["fold"] != k}

    manifest = {r["ImageId"]: r for r in rows(project / "data/processed/manifest.csv")}
    sub = {r["ImageId"]: r["EncodedPixels"] for r in rows(project / "submission/submission.csv")}
    views = {manifest[i]["view_position"] for i in sub}
    assert views == {"AP", "PA"}  # the demo test set has both groups
    for image_id, rle in sub.items():
        if manifest[image_id]["view_position"] == "AP":
            assert rle == "-1", image_id
        else:
            assert rle != "-1", image_id
