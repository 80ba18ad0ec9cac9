"""Pseudo-labels (issue 14): fold k's own model labels the confident test images, finetune@k
trains on them, and oof/submit/register use the fine-tuned model. The leakage rules are
checked on the shared tiny pipeline (which fine-tunes fold 0) and on a real `dvc repro`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_PSEUDO
from pipeline_helpers import Pipeline, cli, pin_threads, repro, run, set_params, write_params

from pneumoseg.pseudo import EMPTY, LEFT_OUT, POSITIVE, label_maps


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_images_are_labelled_by_their_largest_probability() -> None:
    probs = np.zeros((4, 4, 4), np.float32)
    probs[0, 1:3, 1:3] = [[0.95, 0.6], [0.4, 0.55]]  # confident: positive, mask >= 0.5
    probs[1] += 0.02  # confidently empty
    probs[2, 0, 0] = 0.5  # neither: left out
    probs[3, 3, 3] = 0.9  # exactly positive_confidence: positive
    labels, masks, peaks = label_maps(probs, positive=0.9, negative=0.05, pixel=0.5)
    assert labels == [POSITIVE, EMPTY, LEFT_OUT, POSITIVE]
    assert np.allclose(peaks, [0.95, 0.02, 0.5, 0.9])
    expected = np.zeros((4, 4), np.uint8)
    expected[1, 1] = expected[1, 2] = expected[2, 2] = 1  # 0.4 is below the pixel threshold
    assert np.array_equal(masks[0], expected)
    assert not masks[1].any() and not masks[2].any() and masks[3].sum() == 1
    assert masks.dtype == np.uint8
    labels, masks, _ = label_maps(probs, positive=0.9, negative=0.05, pixel=0.5, min_area=2)
    assert labels == [POSITIVE, EMPTY, LEFT_OUT, LEFT_OUT]  # one pixel is too small an area
    assert masks[0].sum() == 3 and not masks[3].any()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"negative_confidence": 0.95}, "pseudo_label.negative_confidence: must be below"),
        ({"pixel_threshold": 0.95}, "pseudo_label.pixel_threshold: must not exceed"),
        ({"folds": [3]}, "pseudo_label.folds: [3] are not in train.folds"),
        ({"folds": [0], "finetune": {"model": {"arch": "FPN"}}}, "pseudo_label.finetune.model:"),
        (
            {"folds": [0], "finetune": {"parts": [{"lr": -1}]}},
            "pseudo_label.finetune.parts[0].lr: must be > 0",
        ),
        ({"positive_confidence": 1.5}, "pseudo_label.positive_confidence:"),
        (
            {"folds": [0], "finetune": {"parts": [{"size": 96, "epochs": 1}]}},
            "pseudo_label.finetune.parts[0].size: 96 is not the size the fold models predict "
            "at (64, train.parts' last)",
        ),
    ],
)
def test_bad_pseudo_label_params_are_one_line_naming_the_key(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    write_params(tmp_path / "params.yaml", {"pseudo_label": overrides})
    code, _, err = cli("pseudo_label", cwd=tmp_path, check=False)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------- the tiny pipeline (fold 0 tuned)
def test_fold_labels_come_from_its_own_model_and_never_from_the_truth(
    tiny_pipeline: Pipeline,
) -> None:
    root = tiny_pipeline.path
    summary = json.loads((root / "data/pseudo/fold0/pseudo.json").read_text())
    assert summary["labelled_by"] == ["models/folds/fold0/model.pt"]
    opened = tiny_pipeline.reports["pseudo_label@0"]["opened"]["r"]
    assert "models/folds/fold0/model.pt" in opened
    assert not [p for p in opened if "fold1" in p or "members" in p or "truth" in p]
    assert not [p for p in opened if p.startswith(("data/raw", "data/folds.csv", "oof"))]
    manifest = {r["ImageId"]: r for r in rows(root / "data/processed/manifest.csv")}
    test = sorted(i for i, r in manifest.items() if r["split"] == "test")
    labels = rows(root / "data/pseudo/fold0/labels.csv")
    assert [r["ImageId"] for r in labels] == test  # every test image, each with its label
    counts = {k: sum(r["label"] == k for r in labels) for k in (POSITIVE, EMPTY, LEFT_OUT)}
    assert summary["n_positive"] + summary["n_empty"] > 0, "the tiny thresholds label nothing"
    assert (summary["n_positive"], summary["n_empty"], summary["n_left_out"]) == (
        counts[POSITIVE],
        counts[EMPTY],
        counts[LEFT_OUT],
    )
    kept = (root / "data/pseudo/fold0/ids.txt").read_text().split()
    assert kept == [r["ImageId"] for r in labels if r["label"] != LEFT_OUT]
    masks = np.load(root / f"data/pseudo/fold0/{summary['size']}/masks.npy")
    positive = np.array([r["label"] == POSITIVE for r in labels if r["label"] != LEFT_OUT])
    assert masks.shape[0] == len(kept)
    assert all(m.any() for m in masks[positive]) and not masks[~positive].any()


def test_the_kept_images_go_to_disk_as_they_are_labelled(
    tiny_pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pseudo_label writes each kept image and mask into its output as soon as it is labelled:
    the heap's peak (numpy's arrays included, traced by tracemalloc) does not grow with the
    test set, where holding the kept set would need gigabytes at SIIM's 3,205 test images at
    1024 px. Measured as the peak of 606 test images (the tiny pipeline's 6, and each 100
    times more) over the peak of the 6 alone; the labels are the tiny pipeline's own."""
    import tracemalloc

    from pneumoseg.params import load_params
    from pneumoseg.stages.pseudo_label import label_fold

    project = tiny_pipeline.copy(tmp_path / "p")
    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    label_fold(params, 0, progress=False)  # imports and caches: not what is measured

    def traced_peak() -> tuple[int, dict]:
        tracemalloc.start()
        try:
            summary = label_fold(params, 0, progress=False)
            return tracemalloc.get_traced_memory()[1], summary
        finally:
            tracemalloc.stop()

    small_peak, _ = traced_peak()
    processed = project / "data/processed"
    manifest = rows(processed / "manifest.csv")
    test = [r for r in manifest if r["split"] == "test"]
    copies = 100
    with (processed / "manifest.csv").open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(manifest[0]))
        for k in range(copies):
            for row in test:
                copy = row | {"ImageId": f"{row['ImageId']}.{k:03d}"}
                (processed / f"images/{copy['ImageId']}.png").write_bytes(
                    (processed / f"images/{row['ImageId']}.png").read_bytes()
                )
                writer.writerow(copy)
    big_peak, summary = traced_peak()
    out = project / "data/pseudo/fold0"
    kept = (out / "ids.txt").read_text().split()
    images = np.load(out / f"{summary['size']}/images.npy", mmap_mode="r")
    one_copy = images.nbytes  # the kept images alone, once
    assert len(kept) == images.shape[0] >= copies  # the run kept enough to tell
    assert big_peak - small_peak < one_copy / 2, (small_peak, big_peak, one_copy)
    own = (tiny_pipeline.path / "data/pseudo/fold0/ids.txt").read_text().split()
    original = np.load(tiny_pipeline.path / f"data/pseudo/fold0/{summary['size']}/images.npy")
    first = {i: n for n, i in enumerate(kept)}
    assert all(np.array_equal(images[first[i]], original[n]) for n, i in enumerate(own))


def test_finetune_trains_on_the_folds_images_plus_its_labels_only(tiny_pipeline: Pipeline) -> None:
    import torch

    root = tiny_pipeline.path
    trained = json.loads((root / "metrics/fold0.json").read_text())
    tuned = json.loads((root / "metrics/finetuned/fold0.json").read_text())
    summary = json.loads((root / "data/pseudo/fold0/pseudo.json").read_text())
    n_labelled = summary["n_positive"] + summary["n_empty"]
    # the pseudo-labelled images only train: selection and held-out images are the fold's own
    assert tuned["selection"]["n_train"] == trained["selection"]["n_train"] + n_labelled
    for key in ("n_select", "n_held_out"):
        assert tuned["selection"][key] == trained["selection"][key]
    assert tuned["pseudo_labels"] == summary
    blob = torch.load(root / "models/folds/finetuned/fold0/model.pt", weights_only=True)
    start = torch.load(root / "models/folds/fold0/model.pt", weights_only=True)
    assert blob["meta"]["finetuned_from"] == "models/folds/fold0/model.pt"
    assert blob["meta"]["pseudo_labels"] == summary
    assert any(
        not torch.equal(blob["state_dict"][k], start["state_dict"][k]) for k in start["state_dict"]
    ), "fine-tuning left the weights as they were"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    run_ = client.get_run(tuned["mlflow_run_id"])
    assert run_.info.run_name == "finetune-fold0" and run_.data.tags["stage"] == "finetune"
    assert run_.data.tags["pseudo_labels_by_run"] == summary["labelled_by_run"]
    assert run_.data.params["pseudo_labels.n_positive"] == str(summary["n_positive"])
    assert run_.data.params["pseudo_labels.positive_confidence"] == str(
        TINY_PSEUDO["positive_confidence"]
    )


def test_oof_submit_and_register_use_the_fine_tuned_fold(tiny_pipeline: Pipeline) -> None:
    root = tiny_pipeline.path
    models = json.loads((root / "oof/models.json").read_text())
    assert models["0"]["files"] == ["models/folds/finetuned/fold0/model.pt"]
    assert models["1"]["files"] == ["models/folds/fold1/model.pt"]  # not in pseudo_label.folds
    tuned = json.loads((root / "metrics/finetuned/fold0.json").read_text())
    registered = json.loads((root / "metrics/registered.json").read_text())
    assert registered["training_run_ids"]["fold0"] == tuned["mlflow_run_id"]
    submit = tiny_pipeline.reports["submit"]["opened"]["r"]
    assert "models/folds/finetuned/fold0/model.pt" in submit
    assert "models/folds/fold0/model.pt" not in submit
    evaluation = json.loads((root / "metrics/evaluate.json").read_text())
    found = {d["decision"]: d for d in evaluation["provenance"]["decisions"]}
    assert found["pseudo-labels"]["oof_images_seen"] == 0
    assert "fold 0:" in found["pseudo-labels"]["how"]
    assert evaluation["kaggle_dice_untouched"] is not None


def test_a_training_image_among_the_pseudo_labels_is_refused(
    tiny_pipeline: Pipeline, tmp_path: Path
) -> None:
    project = tiny_pipeline.copy(tmp_path / "p")
    labels = project / "data/pseudo/fold0/labels.csv"
    train_id = rows(project / "data/folds.csv")[0]["ImageId"]
    with labels.open("a") as fh:
        fh.write(f"{train_id},positive,0.99\n")
    code, _, err = cli("finetune", "--fold", "0", cwd=project, check=False)
    assert code == 1 and "pseudo-labelled images are training images" in err
    assert str(Path("data/pseudo/fold0")) in err and len(err.strip().splitlines()) == 1


def test_enabling_pseudo_labels_reruns_only_what_uses_them(
    dvc_project: object, tmp_path: Path
) -> None:
    """A real `dvc repro`: the two stages appear, the trained folds stay up to date, and the
    stages after them are out of date (they use the fine-tuned model)."""
    project = dvc_project.copy(tmp_path / "p")  # type: ignore[attr-defined]
    set_params(project, {"pseudo_label": TINY_PSEUDO})
    status = json.loads(run(["dvc", "status", "--json"], cwd=project).stdout)
    assert not {"train@0", "train@1"} & set(status)
    assert {"pseudo_label@0", "finetune@0", "oof", "submit", "register"} <= set(status)
    ran = repro(project, "finetune@0")  # (the later stages: the tiny pipeline runs them)
    assert ran == {"pseudo_label@0", "finetune@0"}
    status = json.loads(run(["dvc", "status", "--json"], cwd=project).stdout)
    assert {"oof", "submit", "register"} <= set(status) and "finetune@0" not in status
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock["finetune@0"]["cmd"] == "pneumoseg -q finetune --fold 0"
    deps = {d["path"] for d in lock["pseudo_label@0"]["deps"]}
    assert "models/folds/fold0/model.pt" in deps and "models/folds/fold1/model.pt" not in deps
    assert (project / "models/folds/finetuned/fold0/model.pt").is_file()


def test_a_killed_finetune_resumes_to_the_same_weights_and_run(
    tiny_pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_threads(monkeypatch)  # bit-for-bit weights: one thread count
    import signal
    import subprocess
    import sys

    import torch
    from pipeline_helpers import env

    two_epochs = {"finetune": {"parts": [{**TINY_PSEUDO["finetune"]["parts"][0], "epochs": 2}]}}
    reference, project = (tiny_pipeline.copy(tmp_path / name) for name in ("ref", "killed"))
    for folder in (reference, project):
        set_params(folder, {"pseudo_label": two_epochs})
    cli("-q", "finetune", "--fold", "0", cwd=reference)
    kill_at = Path(__file__).parent / "kill_at.py"
    proc = subprocess.run(
        [sys.executable, str(kill_at), "1", "-q", "finetune", "--fold", "0"],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = project / "checkpoints/finetuned/fold0/last.pt"
    killed = torch.load(state, map_location="cpu", weights_only=False)["run"]
    assert len(killed["history"]) == 1
    cli("-q", "finetune", "--fold", "0", cwd=project)
    got = json.loads((project / "metrics/finetuned/fold0.json").read_text())
    assert got["mlflow_run_id"] == killed["mlflow_run_id"] and got["epochs"] == 2
    ref_w, got_w = (
        torch.load(p / "models/folds/finetuned/fold0/model.pt", weights_only=True)["state_dict"]
        for p in (reference, project)
    )
    assert [k for k in ref_w if not torch.equal(ref_w[k], got_w[k])] == []
