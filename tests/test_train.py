"""Training: resume equivalence after kill -9, parts hand-over, tracking, failures."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_helpers import Pipeline, env, in_process, pin_threads, reset_outputs, set_params

pytestmark = pytest.mark.slow

FOUR_EPOCHS = {
    "train": {
        "parts": [
            {"size": 64, "epochs": 2, "lr": 0.003, "loss": {"bce": 1, "dice": 1}},
            {
                "size": 96,
                "epochs": 2,
                "lr": 0.001,
                "scheduler": {"name": "constant"},
                "loss": {"bce": 3, "focal": 4, "dice": 1},
                "sample_rate": {"start": 0.6, "end": 0.3, "shape": "step", "steps": 2},
            },
        ]
    }
}


@pytest.fixture(scope="module")
def data_dir(tiny_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline's processed data, with a four-epoch, two-part training."""
    project = tiny_pipeline.copy(tmp_path_factory.mktemp("train") / "base")
    reset_outputs(project)
    set_params(project, FOUR_EPOCHS)
    return project


def clone(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def mlflow_runs(project: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("pneumoseg-stages")
    return client.search_runs([exp.experiment_id]) if exp else []


def test_train_records_everything_and_parts_hand_over(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = clone(data_dir, tmp_path / "p")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # samples in a short run
    in_process("-q", "train", "--fold", "0", cwd=project)
    result = json.loads((project / "metrics/fold0.json").read_text())
    history = (project / "plots/fold0/history.csv").read_text().splitlines()
    header = history[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in history[1:]]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]  # global epochs across parts
    assert [int(r["size"]) for r in rows] == [64, 64, 96, 96]
    assert [int(r["part"]) for r in rows] == [0, 0, 1, 1]
    for key in ("train_bce", "train_dice", "val_focal", "val_kaggle_dice", "val_empty_acc"):
        assert key in header
    assert "train_focal" not in rows[0] or rows[0]["train_focal"] == ""  # part 0 has no focal
    # the model file rebuilds itself and is loadable with weights_only
    from pneumoseg.models import load_model_file

    model, meta = load_model_file(project / "models/folds/fold0/model.pt")
    assert meta["size"] == 96 and meta["fold"] == 0 and meta["mlflow_run_id"]
    import segmentation_models_pytorch as smp  # ... and opens with plain smp, same weights

    plain = smp.from_pretrained(str(project / "models/folds/fold0/smp")).eval()
    assert type(plain) is type(model)
    pairs = zip(plain.state_dict().values(), model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    ckpts = json.loads((project / "models/folds/fold0/checkpoints.json").read_text())
    assert {c["part"] for c in ckpts} == {0, 1} and len(ckpts) <= 4
    for c in ckpts:
        assert (project / "models/folds/fold0/checkpoints" / c["path"]).is_file()
        assert c["path"] == f"part{c['part']}-epoch{c['epoch']:03d}.pt"
    mode = yaml.safe_load((project / "params.yaml").read_text())["train"]["checkpoint"]["mode"]
    part1 = [c for c in ckpts if c["part"] == 1]
    key = lambda c: (c["score"], -c["epoch"])  # noqa: E731
    best = max(part1, key=key) if mode == "max" else min(part1, key=key)
    final = state_dict(project / "models/folds/fold0/model.pt")
    chosen = state_dict(project / "models/folds/fold0/checkpoints" / best["path"])
    assert all(torch.equal(final[k], chosen[k]) for k in final)
    # MLflow: one run with tags, params, per-epoch histories and artifacts
    (run,) = mlflow_runs(project)
    assert run.info.run_id == result["mlflow_run_id"]
    tags = run.data.tags
    assert tags["stage"] == "train" and tags["fold"] == "0"
    assert {"git_commit", "git_dirty", "data_hash", "params_hash"} <= set(tags)
    assert run.data.params["train.parts.1.loss.focal"] == "4.0"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    hist = client.get_metric_history(run.info.run_id, "val_kaggle_dice")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4]
    assert {m.key for m in [*client.get_metric_history(run.info.run_id, "sample_rate")]} == {
        "sample_rate"
    }
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "model", "params.yaml", "environment"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/val_overlays.png"} <= plots
    # what the MLflow UI shows: a model-training experiment, source columns, datasets used,
    # system metrics, and the augmentation pipeline that albumentations can rebuild
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.source.name"] == "pneumoseg train" and tags["mlflow.user"]
    assert tags.get("mlflow.source.git.commit") == (
        tags["git_commit"] if tags["git_commit"] != "unknown" else None
    )
    # (outside DVC, as here, the digest is a sha256 of the file; test_pipeline checks DVC's md5)
    from pneumoseg.lineage import file_digest

    inputs = {d.dataset.name: d for d in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert {n: d.dataset.digest for n, d in inputs.items()} == {
        "processed": "sha256:" + file_digest(project / "data/processed/manifest.csv"),
        "folds": "sha256:" + file_digest(project / "data/folds.csv"),
    }
    assert {t.key: t.value for t in inputs["processed"].tags} == {"mlflow.data.context": "training"}
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert (
        "system/cpu_utilization_percentage" in system
        and "system/system_memory_usage_megabytes" in system
    )
    import albumentations as A

    from pneumoseg.augment import SeededCompose  # registers itself with albumentations

    local = Path(client.download_artifacts(run.info.run_id, "augment", str(tmp_path / "dl")))
    assert sorted(p.name for p in local.iterdir()) == [
        "part0_train_transform.json",
        "part1_train_transform.json",
    ]
    rebuilt = A.from_dict(json.loads((local / "part1_train_transform.json").read_text()))
    assert isinstance(rebuilt, SeededCompose)
    assert any(type(t).__name__ == "HorizontalFlip" for t in rebuilt.transforms)
    assert not (project / "checkpoints/fold0").exists()  # resume state cleaned up


def test_overlays_off_keeps_radiographs_out_of_plots_and_mlflow(
    data_dir: Path, tmp_path: Path
) -> None:
    import cv2

    project = clone(data_dir, tmp_path / "p")
    set_params(project, {"train": {"overlays": False}})
    in_process("-q", "train", "--fold", "0", cwd=project)
    notice = cv2.imread(str(project / "plots/fold0/val_overlays.png"), cv2.IMREAD_UNCHANGED)
    assert notice.ndim == 2 and notice.shape == (60, 520)  # text on white, no radiograph
    assert (notice == 255).mean() > 0.9
    from mlflow.tracking import MlflowClient

    (run,) = mlflow_runs(project)
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    local = client.download_artifacts(run.info.run_id, "plots/val_overlays.png", str(tmp_path))
    assert Path(local).read_bytes() == (project / "plots/fold0/val_overlays.png").read_bytes()


TRICKS = {
    "train": {
        "model": {"decoder_attention": "scse", "norm": "frozen_batch", "freeze_bn_from_part": 1},
        "grad_checkpointing": True,
        "ema": {"decay": 0.9},
        "checkpoint": {"final": "ema", "top_k": 2},
        "parts": [
            FOUR_EPOCHS["train"]["parts"][0],
            FOUR_EPOCHS["train"]["parts"][1]
            | {
                "optimizer": {"name": "sgd", "momentum": 0.9},
                "loss": {"bce": 1, "jaccard": 1, "label_smoothing": 0.05},
                "scheduler": {"name": "cosine_restarts", "restart_epochs": 1, "warmup_epochs": 0},
            },
        ],
        "snapshots": True,
    }
}


def test_tricks_train_together_and_do_what_they_claim(data_dir: Path, tmp_path: Path) -> None:
    """scSE, BatchNorm statistics frozen from part 1, gradient checkpointing, an SGD part after
    an Adam part with two one-epoch restart cycles (two snapshots), Jaccard + smoothed bce, and
    the EMA as the final weights."""
    project = clone(data_dir, tmp_path / "tricks")
    set_params(project, TRICKS)
    in_process("-q", "train", "--fold", "0", cwd=project)
    folder = project / "models/folds/fold0"
    result = json.loads((project / "metrics/fold0.json").read_text())
    assert result["final_weights"] == "ema"
    handed_over = state_dict(folder / "checkpoints/part0-epoch002.pt")
    part1 = [state_dict(folder / f"checkpoints/part1-epoch00{e}.pt") for e in (3, 4)]
    stats = [k for k in handed_over if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(s[k], handed_over[k]) for s in part1 for k in stats)
    weights = [
        k for k in handed_over if k.endswith("weight") and handed_over[k].is_floating_point()
    ]
    assert any(not torch.equal(part1[-1][k], handed_over[k]) for k in weights)  # it trained
    final = state_dict(folder / "model.pt")
    assert any(not torch.equal(final[k], part1[-1][k]) for k in weights)  # the EMA, not the last
    from pneumoseg.models import load_model_file

    model, meta = load_model_file(folder / "model.pt")
    assert meta["decoder_attention"] == "scse" and meta["norm"] == "frozen_batch"
    assert any(type(m).__name__ == "SCSEModule" for m in model.modules())
    (run,) = mlflow_runs(project)
    logged = run.data.params
    assert logged["train.model.decoder_attention"] == "scse"
    assert logged["train.parts.1.optimizer.name"] == "sgd"
    assert logged["train.parts.1.loss.label_smoothing"] == "0.05"
    assert logged["train.ema.decay"] == "0.9" and logged["train.grad_checkpointing"] == "True"
    assert "train_jaccard" in (project / "plots/fold0/history.csv").read_text()
    # one snapshot per restart cycle, distinct weights, usable as an ensemble
    from pneumoseg.inference import Ensemble, fold_model_files

    files = fold_model_files(project / "models/folds", 0, "snapshots")
    assert [f.name for f in files] == ["snapshot-part1-cycle0.pt", "snapshot-part1-cycle1.pt"]
    first, second = (state_dict(f) for f in files)
    assert any(not torch.equal(first[k], second[k]) for k in weights)
    assert all(torch.equal(second[k], part1[-1][k]) for k in second)  # cycle 1 ends the part
    probs, _ = Ensemble(files, tta_hflip=False).predict([np.zeros((64, 64), np.uint8)])
    assert probs.shape == (1, 96, 96)


# Two parts; SWA over the last two epochs of part 1 (global epochs 6 and 7).
MID_PART = {
    "train": {
        "checkpoint": {"top_k": 2, "final": "swa"},
        "swa": {"epochs": 2, "lr": 0.0005},
        "parts": [
            {"size": 64, "epochs": 3, "lr": 0.003, "loss": {"bce": 1, "dice": 1}},
            {
                "size": 64,
                "epochs": 4,
                "lr": 0.001,
                "scheduler": {"name": "cosine", "min_lr": 0.0001},
                "loss": {"bce": 1, "dice": 1},
                "sample_rate": {"start": 0.6, "end": 0.4, "shape": "linear"},
            },
        ],
    }
}


def kill_after(project: Path, fold: int, epochs: int) -> dict:
    """Run `pneumoseg train` in a process that kill -9s itself right after its resume state
    holds ``epochs`` epochs (tests/kill_at.py); returns that state's run record."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "kill_at.py"), str(epochs)]
        + ["-q", "train", "--fold", str(fold)],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = project / f"checkpoints/fold{fold}/last.pt"
    return torch.load(state, map_location="cpu", weights_only=False)["run"]


def history_rows(project: Path, fold: int = 0) -> list[dict[str, str]]:
    import csv

    with (project / f"plots/fold{fold}/history.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_observed_heldout_curves_change_nothing_the_training_decides(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.observe_heldout_every: the held-out fold scored every epoch, observed only: the
    weights, the checkpoint ranking and the record are bit for bit those of a run that never
    looks, and the last look equals the final record's held-out score of the same weights."""
    pin_threads(monkeypatch)  # bit-for-bit weights: one thread count
    # a classification head trains through dropout: the global random stream matters
    parts = [p | {"loss": p["loss"] | {"cls": 0.5}} for p in FOUR_EPOCHS["train"]["parts"]]
    train = {"checkpoint": {"top_k": 2, "final": "last"}, "parts": parts}
    train["model"] = {"classification_head": True}
    runs = {}
    for every in (1, 0):
        project = clone(data_dir, tmp_path / f"every{every}")
        set_params(project, {"train": {"observe_heldout_every": every, **train}})
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["ensemble"]["members"] = {}  # the tiny member has no classifier loss
        params["pseudo_label"]["folds"] = []
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        in_process("-q", "train", "--fold", "0", cwd=project)
        runs[every] = project
    looked, blind = runs[1], runs[0]
    ref = state_dict(blind / "models/folds/fold0/model.pt")
    got = state_dict(looked / "models/folds/fold0/model.pt")
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []
    for name in ("checkpoints.json",):
        assert (looked / "models/folds/fold0" / name).read_text() == (
            blind / "models/folds/fold0" / name
        ).read_text()
    looked_record = json.loads((looked / "metrics/fold0.json").read_text())
    blind_record = json.loads((blind / "metrics/fold0.json").read_text())
    for key in ("best_epoch", "final", "heldout", "best"):
        assert looked_record[key] == blind_record[key], key
    rows, plain = history_rows(looked), history_rows(blind)
    assert all(r["observed_heldout_loss"] for r in rows)  # every epoch
    assert "observed_heldout_loss" not in plain[0]
    for a, b in zip(rows, plain, strict=True):  # the training columns are identical
        assert {k: a[k] for k in b if k != "epoch_seconds"} == {
            k: b[k] for k in b if k != "epoch_seconds"
        }
    # the last look scored the final (= last) weights on the held-out fold, as the record did
    heldout = looked_record["heldout"]
    assert float(rows[-1]["observed_heldout_loss"]) == pytest.approx(heldout["heldout_loss"])
    assert float(rows[-1]["observed_heldout_kaggle_dice"]) == pytest.approx(
        heldout["heldout_kaggle_dice"]
    )
    assert float(rows[-1]["observed_heldout_dice_pos"]) == pytest.approx(
        heldout["heldout_dice_pos"]
    )


def test_kill_mid_part_and_in_swa_then_resume_gives_identical_weights(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_threads(monkeypatch)  # bit-for-bit weights: one thread count
    reference = clone(data_dir, tmp_path / "ref")
    set_params(reference, MID_PART)
    in_process("-q", "train", "--fold", "1", cwd=reference)

    project = clone(data_dir, tmp_path / "killed")
    set_params(project, MID_PART)
    first = kill_after(project, 1, 1)  # inside part 0: epoch 1 of 3 done
    assert (first["part"], first["epoch_in_part"]) == (0, 0), first["history"][-1:]
    second = kill_after(project, 1, 6)  # inside part 1 with SWA active: 3 of 4 done
    assert (second["part"], second["epoch_in_part"]) == (1, 2), second["history"][-1:]
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert not (project / "models/folds/fold1/model.pt").exists()
    in_process("-q", "train", "--fold", "1", cwd=project)

    ref = state_dict(reference / "models/folds/fold1/model.pt")
    got = state_dict(project / "models/folds/fold1/model.pt")
    assert ref.keys() == got.keys()
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []
    ref_metrics = json.loads((reference / "metrics/fold1.json").read_text())
    got_metrics = json.loads((project / "metrics/fold1.json").read_text())
    assert got_metrics["final"] == ref_metrics["final"]
    assert got_metrics["final_weights"] == "swa"
    assert got_metrics["mlflow_run_id"] == first["mlflow_run_id"]  # one run, continued
    (run,) = mlflow_runs(project)
    assert run.info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    per_epoch = [k for k in run.data.metrics if not k.startswith(("final_", "heldout_", "system/"))]
    assert {"train_loss", "val_loss", "lr", "sample_rate"} <= set(per_epoch)
    every = yaml.safe_load((project / "params.yaml").read_text())["train"]["observe_heldout_every"]
    observed = [e for e in range(1, 8) if e % every == 0 or e == 7]  # and after the last
    assert observed and {"observed_heldout_loss", "observe_seconds"} <= set(per_epoch)
    for key in per_epoch:  # exactly one value per metric and epoch, none lost, none twice
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        expected = observed if key.startswith("observe") else list(range(1, 8))
        assert sorted(steps) == expected, (key, steps)
    assert not (project / "checkpoints/fold1").exists()


def test_a_kill_while_saving_loses_no_checkpoint_and_logs_no_epoch_twice(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """top_k 1 on a metric that improves every epoch: each epoch evicts the previous file.
    A kill in the middle of writing epoch 2's state (half its bytes written) must leave the
    saved state of epoch 1 whole, and epoch 1's file, which that state still lists, on disk;
    the rerun then completes, and the epoch that ran twice is logged once."""
    from pipeline_helpers import cli

    import pneumoseg.training.state as state_module

    project = clone(data_dir, tmp_path / "evict")
    set_params(project, {"train": {"checkpoint": {"top_k": 1, "monitor": "epoch", "mode": "max"}}})
    original = state_module.torch.save
    landed: list[int] = []

    def dies_writing_epoch_two(obj: object, fh: object, *args: object, **kw: object) -> None:
        run = obj.get("run") if isinstance(obj, dict) else None  # the resume state only
        if isinstance(run, dict) and len(run["history"]) == 2:
            fh.write(b"half of a state")  # type: ignore[attr-defined]
            landed.append(2)
            raise KeyboardInterrupt("killed while saving")
        return original(obj, fh, *args, **kw)

    monkeypatch.setattr(state_module.torch, "save", dies_writing_epoch_two)
    code, _, err = cli("-q", "train", "--fold", "0", cwd=project, check=False)
    assert landed == [2]  # the kill landed inside save(), mid-write
    assert code == 130 and "stopped by SIGINT; rerun the same command" in err
    saved = torch.load(project / "checkpoints/fold0/last.pt", weights_only=False)["run"]
    assert len(saved["history"]) == 1
    listed = [c["path"] for c in saved["topk"]]
    assert listed == ["part0-epoch001.pt"]
    assert all((project / "checkpoints/fold0" / name).is_file() for name in listed)
    assert not list((project / "checkpoints/fold0").glob(".*.tmp"))  # the torn write is gone
    monkeypatch.setattr(state_module.torch, "save", original)
    cli("-q", "train", "--fold", "0", cwd=project)
    ckpts = json.loads((project / "models/folds/fold0/checkpoints.json").read_text())
    assert [(c["part"], c["epoch"]) for c in ckpts] == [(0, 2), (1, 4)]
    # epoch 2 ran twice (before the kill and after it) but is in the MLflow run once
    from mlflow.tracking import MlflowClient

    (run,) = mlflow_runs(project)
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    for key in ("train_loss", "val_loss", "val_kaggle_dice", "lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3, 4], (key, steps)


def test_tracking_failure_does_not_stop_training(data_dir: Path, tmp_path: Path) -> None:
    project = clone(data_dir, tmp_path / "offline")
    e = env() | {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # nothing listens there
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pneumoseg", "-q", "train", "--fold", "0"],
        cwd=project,
        env=e,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MLflow start failed" in proc.stderr
    assert (project / "models/folds/fold0/model.pt").is_file()
    result = json.loads((project / "metrics/fold0.json").read_text())
    assert result["mlflow_run_id"] is None
    assert len((project / "plots/fold0/history.csv").read_text().splitlines()) == 5
    assert "pneumoseg upload --fold K" in proc.stderr

    # Once the store is back, the local record becomes an MLflow run, without retraining.
    in_process("-q", "upload", "--fold", "0", cwd=project)
    result = json.loads((project / "metrics/fold0.json").read_text())
    runs = mlflow_runs(project)
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    run = runs[0]
    assert run.data.tags["uploaded_after_tracking_failure"] == "true"
    assert run.data.params["train.parts.0.epochs"] == "2"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3, 4]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.pt" in arts
    # a second upload does nothing
    in_process("-q", "upload", "--fold", "0", cwd=project)
    assert len(mlflow_runs(project)) == 1


def test_bad_monitor_and_bad_weights_fail_clearly(data_dir: Path, tmp_path: Path) -> None:
    project = clone(data_dir, tmp_path / "bad")
    params = project / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("encoder_weights: null", "encoder_weights: /no/such.pth"))
    proc = in_process("train", "--fold", "0", cwd=project, check=False)
    assert proc.returncode == 1
    assert "model.encoder_weights" in proc.stderr and "/no/such.pth" in proc.stderr


def test_a_diverged_training_stops_with_one_line_and_a_failed_run(
    data_dir: Path, tmp_path: Path
) -> None:
    """A NaN loss (or monitored metric) is not dropped from the checkpoint ranking unseen: the
    training stops at that epoch with one line naming the fold, epoch, key and way out, the
    MLflow run ends FAILED and no model file is written."""
    project = clone(data_dir, tmp_path / "p")
    parts = [p | {"lr": 1.0e9} for p in FOUR_EPOCHS["train"]["parts"]]
    set_params(project, {"train": {"parts": parts}})
    proc = in_process("-q", "train", "--fold", "0", cwd=project, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("pneumoseg train: error:")]
    assert "train fold 0 epoch 1:" in line and "is nan" in line and "train.parts[0].lr" in line
    assert "Traceback" not in proc.stderr
    assert not (project / "models/folds/fold0/model.pt").exists()
    (run,) = mlflow_runs(project)
    assert run.info.status == "FAILED"


def test_a_kill_between_the_final_record_and_its_file_logs_nothing_twice(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fold's final_* and heldout_* metrics are logged before metrics/fold<k>.json is
    written; a kill between the two makes the rerun write the record again: each of those
    metrics still holds exactly one value."""
    from mlflow.tracking import MlflowClient
    from pipeline_helpers import cli

    import pneumoseg.training.record as record_module

    project = clone(data_dir, tmp_path / "p")
    original = record_module.write_json
    landed: list[str] = []

    def dies_before_the_record(path: object, data: object, *args: object) -> None:
        if str(path).endswith("fold0.json"):
            landed.append(str(path))
            raise KeyboardInterrupt("killed before the record file")
        original(path, data, *args)

    monkeypatch.setattr(record_module, "write_json", dies_before_the_record)
    code, _, _ = cli("-q", "train", "--fold", "0", cwd=project, check=False)
    assert code == 130 and len(landed) == 1
    assert not (project / "metrics/fold0.json").exists()
    (run,) = mlflow_runs(project)
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    finals = [k for k in run.data.metrics if k.startswith(("final_", "heldout_"))]
    assert "heldout_kaggle_dice" in finals and "final_kaggle_dice" in finals  # logged once
    monkeypatch.setattr(record_module, "write_json", original)
    cli("-q", "train", "--fold", "0", cwd=project)
    assert json.loads((project / "metrics/fold0.json").read_text())["mlflow_run_id"] == (
        run.info.run_id
    )
    for key in finals:
        history = client.get_metric_history(run.info.run_id, key)
        assert len(history) == 1, (key, [(m.step, m.value) for m in history])


def test_the_shipped_training_section_averages_its_last_epochs(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training section of the shipped params.yaml (no selection split, SWA of the last
    epochs), only its sizes, epochs and decoder shrunk: the fold's weights are the average of
    the last swa.epochs epochs' weights (the checkpoints of a run without selection are its last
    epochs), with BatchNorm statistics recomputed on the training images, by hand here."""
    import csv

    from torch.utils.data import DataLoader

    from pneumoseg.data import SegDataset
    from pneumoseg.models import load_model_file

    pin_threads(monkeypatch)
    shipped = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())["train"]
    assert shipped["selection"]["mode"] == "none" and shipped["checkpoint"]["final"] == "swa"
    train = shipped | {"folds": [0, 1], "batch_size": 4, "swa": shipped["swa"] | {"epochs": 2}}
    train["model"] = shipped["model"] | {"decoder_channels": [32, 16, 8, 8, 4]}
    epochs = (2, 3)
    train["parts"] = [
        p | {"size": 64, "epochs": e} for p, e in zip(shipped["parts"], epochs, strict=True)
    ]
    train["checkpoint"] = shipped["checkpoint"] | {"top_k": 2}  # keeps the last 2 epochs
    project = clone(data_dir, tmp_path / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"] = params["train"] | train
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    in_process("-q", "train", "--fold", "0", cwd=project)
    folder = project / "models/folds/fold0"
    last = sorted(json.loads((folder / "checkpoints.json").read_text()), key=lambda c: c["epoch"])
    last = [c for c in last if c["part"] == 1]
    assert [c["epoch"] for c in last] == [4, 5]  # the last two epochs of the last part
    states = [state_dict(folder / "checkpoints" / c["path"]) for c in last]
    net, _ = load_model_file(folder / "checkpoints" / last[0]["path"])
    averaged = {k: (v.float() + states[1][k].float()) / 2 for k, v in states[0].items()}
    net.load_state_dict({k: v.to(states[0][k].dtype) for k, v in averaged.items()})
    with (project / "data/folds.csv").open(newline="") as fh:
        train_ids = sorted(r["ImageId"] for r in csv.DictReader(fh) if r["fold"] != "0")
    images = SegDataset(train_ids, project / "data/arrays", 64, 1)
    loader = DataLoader(images, batch_size=4, shuffle=False)
    torch.optim.swa_utils.update_bn(((x, y) for x, y, _ in loader), net)
    expected = net.state_dict()
    final = state_dict(folder / "model.pt")
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        if value.is_floating_point():
            assert torch.allclose(final[key], value, atol=2e-6), key
        else:
            assert torch.equal(final[key], value), key
    # and not merely one of the two epochs
    assert any(not torch.equal(final[k], states[1][k]) for k in final if "running" not in k)
