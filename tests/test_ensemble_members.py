"""Multi-model ensembles (``ensemble.members``): member stages, OOF maps per member, fitted
weights (cross-fitted in evaluate) and inference that combines members at one common size."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import TINY_MEMBER
from oof_maps import blended
from pipeline_helpers import Pipeline, cli, run, set_params, write_params

from pneumoseg.postprocess import (
    SearchSettings,
    TripletScorer,
    WeightedMaps,
    exhaustive_best,
    fit_weights,
    weight_grid,
)

AREAS = (0.0, 20.0, 60.0)
SETTINGS = SearchSettings(
    trials=1, seed=0, space={}, exhaustive=True, areas=AREAS, gates=(None,), group_by=None
)


def noisy_members(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Truth squares in half of 40 images; two members that see them through independent
    noise (so their mean is better than either)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((40, 32, 32), np.uint8)
    for i in range(0, 40, 2):
        y, x = rng.integers(0, 20, 2)
        masks[i, y : y + 10, x : x + 10] = 1
    maps = {}
    for name in ("a", "b"):
        noise = rng.normal(0, 70, masks.shape)
        maps[name] = np.clip(masks * 150 + 50 + noise, 0, 255).astype(np.uint8)
    return maps, masks


def grid_optimum(probs: np.ndarray, masks: np.ndarray, subset: np.ndarray | None = None) -> float:
    """The exhaustive triplet optimum of one set of maps, computed on its own."""
    return exhaustive_best(TripletScorer(probs, masks, 1024), AREAS, (None,), subset)[1]


def test_weighted_maps_are_the_rounded_weighted_mean() -> None:
    maps, _ = noisy_members()
    assert np.array_equal(WeightedMaps(maps, {"a": 1.0, "b": 0.0})[:], maps["a"])
    exact = (maps["a"][5:9].astype(np.int64) * 3 + maps["b"][5:9].astype(np.int64) * 7) / 10
    got = WeightedMaps(maps, {"a": 3.0, "b": 7.0})[5:9]  # weights are normalised
    assert np.abs(got - exact).max() <= 0.5 + 1e-4  # the nearest level (ties either way)
    clear = np.abs(exact - np.floor(exact) - 0.5) > 1e-3
    assert np.array_equal(got[clear], np.rint(exact[clear]))
    with pytest.raises(ValueError, match="weights for"):
        WeightedMaps(maps, {"a": 1.0})


def test_the_grid_holds_the_equal_mean_and_each_member_alone() -> None:
    two = weight_grid(["a", "b"], 0.1)
    assert two[0] == {"a": 0.5, "b": 0.5} and two[1] == {"a": 1.0, "b": 0.0}
    assert two[2] == {"a": 0.0, "b": 1.0} and len(two) == 11
    three = weight_grid(["a", "b", "c"], 0.5)
    assert three[0] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert len(three) == 1 + 6  # equal + the 6 points of the 0.5 lattice (alone ones included)
    assert all(sum(w.values()) == pytest.approx(1) for w in three)


def test_fitted_weights_never_score_below_the_best_member_on_their_images() -> None:
    maps, masks = noisy_members()
    fit = fit_weights(maps, masks, 1024, {"a": None, "b": None}, SETTINGS, 0.1, {"all": None})
    fit = fit["all"]
    alone = {n: grid_optimum(maps[n], masks) for n in maps}  # independent of the fit
    assert fit.alone("a") == pytest.approx(alone["a"]) and fit.alone("b") == pytest.approx(
        alone["b"]
    )
    assert fit.score >= max(alone.values())
    # independent noise: a mixture beats either member alone here
    assert fit.score > max(alone.values()) + 0.01
    assert 0 < fit.weights["a"] < 1
    blended = WeightedMaps(maps, fit.weights)[:]
    assert fit.score == pytest.approx(grid_optimum(blended, masks))


def test_weights_fitted_on_a_subset_see_only_it() -> None:
    maps, masks = noisy_members(seed=3)
    half = np.arange(20)
    fits = fit_weights(maps, masks, 1024, {}, SETTINGS, 0.25, {"half": half, "all": None})
    blended = WeightedMaps(maps, fits["half"].weights)[:]
    assert fits["half"].score == pytest.approx(grid_optimum(blended, masks, half))
    assert len(fits["half"].candidates) == len(weight_grid(["a", "b"], 0.25))


def test_member_params_are_validated_with_the_key_named(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", {"ensemble": {"members": {"fpn": {"modle": {}}}}})
    code, _, err = cli("split", cwd=tmp_path, check=False)
    assert code == 2 and "ensemble.members.fpn.modle: unknown key" in err
    write_params(tmp_path / "params.yaml", {"ensemble": {"members": {"fpn": {"folds": [0]}}}})
    code, _, err = cli("split", cwd=tmp_path, check=False)
    assert code == 2 and "ensemble.members.fpn.folds: shared by every member" in err
    write_params(tmp_path / "params.yaml", {"ensemble": {"members": {"fpn": {"seed": 1}}}})
    code, _, err = cli("train", "--fold", "0", "--member", "unet", cwd=tmp_path, check=False)
    assert code == 1 and "no member 'unet' (members: fpn)" in err


def test_an_ensemble_combines_members_at_the_first_members_size(tmp_path: Path) -> None:
    import torch

    from pneumoseg.inference import Ensemble
    from pneumoseg.models import build_model, save_model_file
    from pneumoseg.params import ModelParams

    cfg = ModelParams(encoder="tu-mobilenetv3_small_100", decoder_channels=[16, 8, 8, 4, 4])
    files = {}
    for name, size in (("main", 64), ("small", 32)):
        torch.manual_seed(len(name))
        meta = cfg.model_dump() | {"size": size, "fold": 0, "member": name}
        files[name] = tmp_path / f"{name}.pt"
        save_model_file(files[name], build_model(cfg).state_dict(), meta)
    images = [np.random.default_rng(i).integers(0, 255, (96, 96), dtype=np.uint8) for i in (1, 2)]
    alone = {n: Ensemble([f], device="cpu").predict(images)[0] for n, f in files.items()}
    assert alone["small"].shape == (2, 32, 32)
    pair = [files["main"], files["small"]]
    both = Ensemble(pair, device="cpu", weights={"main": 1, "small": 3})
    assert both.size == 64
    small_up = np.stack(
        [cv2.resize(p, (64, 64), interpolation=cv2.INTER_LINEAR) for p in alone["small"]]
    )
    expected = 0.25 * alone["main"] + 0.75 * small_up
    np.testing.assert_allclose(both.predict(images)[0], expected, atol=1e-6)
    only_main = Ensemble(pair, device="cpu", weights={"main": 1, "small": 0})
    np.testing.assert_array_equal(only_main.predict(images)[0], alone["main"])
    with pytest.raises(ValueError, match="member weights for"):
        Ensemble([files["main"]], device="cpu", weights={"main": 0.5, "small": 0.5})


# ------------------------------------------------------------------- the tiny pipeline's member
def test_the_member_trains_on_the_same_folds_with_its_own_record(tiny_pipeline: Pipeline) -> None:
    import torch

    root = tiny_pipeline.path
    for k in (0, 1):
        meta = torch.load(root / f"models/folds/members/tiny/fold{k}/model.pt", weights_only=True)[
            "meta"
        ]
        assert (meta["member"], meta["size"], meta["fold"]) == ("tiny", 32, k)
        member = TINY_MEMBER["members"]["tiny"]
        assert meta["decoder_channels"] == member["model"]["decoder_channels"]
        main = torch.load(root / f"models/folds/fold{k}/model.pt", weights_only=True)["meta"]
        assert (main["member"], main["size"]) == ("main", 64)
        assert meta["params_hash"] != main["params_hash"]
        assert (root / f"metrics/members/tiny/fold{k}.json").is_file()
        assert (root / f"plots/members/tiny/fold{k}/learning_curves.png").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    runs = client.search_runs(
        [client.get_experiment_by_name("pneumoseg-stages").experiment_id],
        "tags.ensemble_member = 'tiny'",
    )
    assert sorted(r.info.run_name for r in runs) == ["train-tiny-fold0", "train-tiny-fold1"]
    assert {r.data.params["train.model.decoder_channels"] for r in runs} == {"[16, 8, 8, 4, 4]"}


def test_oof_thresholds_and_evaluate_compare_members_honestly(tiny_pipeline: Pipeline) -> None:
    root = tiny_pipeline.path
    main = np.load(root / "oof/probs.npy")
    tiny = np.load(root / "oof/members/tiny/probs.npy")
    masks = np.load(root / "oof/masks.npy")
    assert tiny.shape == main.shape == masks.shape and not np.array_equal(tiny, main)
    post = json.loads((root / "models/postprocess.json").read_text())
    weights = post["member_weights"]
    assert set(weights) == {"main", "tiny"} and sum(weights.values()) == pytest.approx(1)
    fit = post["member_weight_fit"]
    # each member alone, scored on its own maps here, is what the fit recorded; the fitted
    # weights score at least as well as the best of them on the images they were fitted on
    manifest = {r["ImageId"]: r for r in csv_rows(root / "data/processed/manifest.csv")}
    ids = [r["ImageId"] for r in csv_rows(root / "oof/ids.csv")]
    native = np.array([int(manifest[i]["width"]) for i in ids])
    areas = yaml.safe_load((root / "params.yaml").read_text())["thresholds"]["exhaustive_areas"]
    for name, maps in (("main", main), ("tiny", tiny)):
        own = exhaustive_best(TripletScorer(maps, masks, native), areas)[1]
        assert fit["alone"][name] == pytest.approx(own)
    # every candidate's score, recomputed on maps blended here; the deployed weights are a
    # candidate with the best of those scores (not merely no worse than a member alone)
    by_hand = []
    for candidate in fit["candidates"]:
        blend = blended({"main": main, "tiny": tiny}, candidate["weights"])
        by_hand.append(exhaustive_best(TripletScorer(blend, masks, native), areas)[1])
        assert candidate["score"] == pytest.approx(by_hand[-1], abs=1e-12), candidate
    assert fit["score"] == pytest.approx(max(by_hand), abs=1e-12)
    best = [c["weights"] for c in fit["candidates"] if c["score"] >= max(by_hand) - 1e-12]
    assert weights in best
    metrics = json.loads((root / "metrics/thresholds.json").read_text())
    assert metrics["member_weights"] == weights
    evaluation = json.loads((root / "metrics/evaluate.json").read_text())
    compared = evaluation["ensemble"]["cross_fitted"]
    assert set(compared) == {"main", "tiny", "equal", "weighted"}
    assert compared["weighted"]["mean"] == pytest.approx(evaluation["kaggle_dice_cross_fitted"])
    assert all(c["n_images"] == len(ids) and c["ci95"] for c in compared.values())
    per_fold = evaluation["per_fold"]
    assert all(set(f["cross_fit_thresholds"]["member_weights"]) == {"main", "tiny"}
               for f in per_fold.values())  # fmt: skip
    decisions = [d["decision"] for d in evaluation["provenance"]["decisions"]]
    assert "member weights" in decisions and "member weights, cross-fitted" in decisions


def test_submit_and_register_use_every_member(
    tiny_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    root = tiny_pipeline.path
    registered = json.loads((root / "metrics/registered.json").read_text())
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for the models:/ URI; undone after the test
    version = mlflow.MlflowClient(uri).get_model_version("pneumoseg", registered["version"])
    assert version.tags["training_run_tiny-fold0"] and version.tags["training_run_fold0"]
    local = mlflow.artifacts.download_artifacts(registered["model_uri"], tracking_uri=uri)
    config = yaml.safe_load((Path(local) / "MLmodel").read_text())["flavors"]["python_function"]
    assert config["config"]["models"] == ["fold0", "fold1", "tiny-fold0", "tiny-fold1"]
    assert (root / "submission/submission.csv").is_file()


def test_adding_a_member_leaves_the_trained_folds_up_to_date(
    dvc_project: object, tmp_path: Path
) -> None:
    project = dvc_project.copy(tmp_path / "p")  # type: ignore[attr-defined]
    set_params(project, {"ensemble": TINY_MEMBER})
    status = json.loads(run(["dvc", "status", "--json"], cwd=project).stdout)
    assert "train@0" not in status and "train@1" not in status
    assert {"member@tiny-0", "member@tiny-1", "oof"} <= set(status)
    run(["dvc", "repro", "member@tiny-0"], cwd=project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert (
        lock["member@tiny-0"]["params"]["params.yaml"]["ensemble.members.tiny"]
        == (TINY_MEMBER["members"]["tiny"])
    )
    assert lock["member@tiny-0"]["cmd"] == "pneumoseg -q train --fold 0 --member tiny"


def csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))
