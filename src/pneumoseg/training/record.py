"""The end of a fold's training: its final weights (best, average of the top-k, last or SWA),
their scores, and the record every later stage and ``pneumoseg upload`` rely on:
``models/fold<k>/`` (model.pt, checkpoints), ``metrics/fold<k>.json``, ``plots/fold<k>/``
and the MLflow run's final metrics and artifacts (:func:`log_fold_record`, the one place that
logs them, for a training and for an upload alike)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import albumentations as A
import numpy as np
import torch
from torch import nn

from pneumoseg.augment import build_train_transform
from pneumoseg.data import SegDataset
from pneumoseg.files import staged_dir, write_json
from pneumoseg.lineage import pip_freeze
from pneumoseg.losses import ComboLoss
from pneumoseg.metrics import SegMetrics
from pneumoseg.models import (
    average_state_dicts,
    forward,
    plain_smp_rebuilds,
    save_model_file,
    save_smp_folder,
)
from pneumoseg.params import Params, stage_values
from pneumoseg.plots import pixel_free_notice, plot_history, save_overlay_grid
from pneumoseg.tracking import Tracker
from pneumoseg.training.callbacks import write_history
from pneumoseg.training.distributed import unwrap
from pneumoseg.training.state import load_checkpoint

if TYPE_CHECKING:
    from pneumoseg.training.trainer import FoldTrainer

log = logging.getLogger("pneumoseg.training")


def val_row(losses: dict[str, float], m: dict[str, float], prefix: str = "val_") -> dict[str, Any]:
    """The validation columns of a history row (or of a final-metrics record)."""
    return {
        f"{prefix}loss": losses["loss"],
        **{f"{prefix}{k}": v for k, v in losses.items() if k != "loss"},
        f"{prefix}kaggle_dice": m["kaggle_dice"],
        f"{prefix}kaggle_dice_area": m["kaggle_dice_area"],
        f"{prefix}dice_pos": m["dice_pos"],
        f"{prefix}iou_pos": m["iou_pos"],
        f"{prefix}empty_acc": m["empty_acc"],
        f"{prefix}pos_acc": m["pos_acc"],
    }


def model_meta(t: FoldTrainer, size: int) -> dict[str, Any]:
    """What a model file needs to rebuild the network, and its lineage."""
    m = t.cfg.model
    return {
        "arch": m.arch,
        "encoder": m.encoder,
        "in_channels": m.in_channels,
        "decoder_channels": m.decoder_channels,
        "classification_head": m.classification_head,
        "decoder_attention": m.decoder_attention,
        "norm": m.norm,
        "size": size,
        "fold": t.fold,
        "member": t.member,
        "params_hash": t.params_hash,
        "data_hash": t.data_hash,
        "val_threshold": t.cfg.val_threshold,
        # the held-out fold's observed_heldout_* curves (no decision read them; 0: none)
        "observe_heldout_every": t.cfg.observe_heldout_every if t.observes_at_all else 0,
        "selection": {
            "mode": t.cfg.selection.mode,
            "inner_fraction": t.cfg.selection.inner_fraction,
            "seed": t.cfg.seed,
            "n_select": len(t.val_ids),
        },
    } | t.record_extra


def final_weights(t: FoldTrainer, swa_model: Any) -> dict[str, torch.Tensor]:
    """``train.checkpoint.final`` of the last part: its best or top-k average checkpoint, the
    last epoch's weights, the SWA average (BatchNorm statistics recomputed, or the frozen ones
    kept) or the EMA of the weights."""
    kind, size = t.cfg.checkpoint.final, t.cfg.parts[-1].size
    if kind == "swa" and swa_model is not None:
        if t.bn_frozen(len(t.cfg.parts) - 1):
            for averaged, live in zip(swa_model.module.buffers(), t.model.buffers(), strict=True):
                averaged.copy_(live)
        else:
            loader = t.eval_loader(t.train_ids, size, shard=False)  # same on every rank
            torch.optim.swa_utils.update_bn(loader, swa_model, t.device)
        return swa_model.module.state_dict()
    if kind == "ema" and t.ema is not None:
        return {k: v.detach().clone() for k, v in t.ema.module.state_dict().items()}
    if kind == "last":
        return {k: v.detach().clone() for k, v in unwrap(t.model).state_dict().items()}
    best = t.best_of_part(len(t.cfg.parts) - 1)
    blobs = [load_checkpoint(t.work / c["path"]) for c in best]
    if kind == "average_top_k":
        return average_state_dicts([b["state_dict"] for b in blobs])
    return blobs[0]["state_dict"]


def finish(t: FoldTrainer, swa_model: Any) -> dict[str, Any]:
    """Score the final weights (the selection split, then the held-out fold once every
    decision is made), write the fold's record, log it and delete the resume state."""
    cfg, state = t.cfg, t.state
    size = cfg.parts[-1].size
    t.dist.barrier()  # rank 0 deletes the work folder at the end
    weights = final_weights(t, swa_model)
    model = t.model
    model.load_state_dict(weights)
    loss_fn = ComboLoss(cfg.parts[-1].loss)
    final = None
    if t.val_ids:  # the selection split's view of the final weights (studies use it)
        va, m = t.validate(model, t.eval_loader(t.val_ids, size), loss_fn)
        final = val_row(va, m.compute())
    hv, held = t.validate(model, t.eval_loader(t.images.held_out, size), loss_fn)
    held_scores = held.compute()
    heldout = val_row(hv, held_scores, "heldout_")
    heldout["heldout_empty_baseline"] = held_scores["empty_baseline"]
    if t.tracker.reconnect():  # back since the last epoch: the run, then the epochs it misses
        state.mlflow_run_id = state.mlflow_run_id or t.tracker.run_id
        t.tracker.log_rows(state.history)
    best = t.best_of_part(len(cfg.parts) - 1)
    best_row = next((r for r in state.history if r["epoch"] == best[0]["epoch"]), {})
    result = {
        "fold": t.fold,
        "mlflow_run_id": state.mlflow_run_id,
        "selection": {
            "mode": cfg.selection.mode,
            "inner_fraction": cfg.selection.inner_fraction,
            "n_train": len(t.train_ids),
            "n_select": len(t.val_ids),
            "n_held_out": len(t.images.held_out),
        },
        "final_weights": cfg.checkpoint.final,
        "best_epoch": best[0]["epoch"],
        "monitor": t.monitor,
        "best": {k: v for k, v in best_row.items() if k.startswith("val_")},
        "final": final,
        "heldout": heldout,
        "epochs": len(state.history),
        "params_hash": t.params_hash,
        "data_hash": t.data_hash,
    } | t.record_extra
    if cfg.snapshots and not state.snapshots:
        log.warning(
            "train fold %d: train.snapshots is on, but no part completed a cosine_restarts "
            "cycle: no snapshot saved",
            t.fold,
        )
    if not t.dist.main:
        return result
    meta = t.meta(size) | {"mlflow_run_id": state.mlflow_run_id, "final": cfg.checkpoint.final}
    with staged_dir(t.out) as out:  # a kill or a full disk leaves the previous fold folder
        (out / "checkpoints").mkdir()
        save_model_file(out / "model.pt", weights, meta)
        if plain_smp_rebuilds(cfg.model):  # (README "Tricks": when it cannot)
            save_smp_folder(out / "model.pt", out / "smp")  # opens with smp.from_pretrained
        for c in state.topk:
            shutil.copy2(t.work / c["path"], out / "checkpoints" / c["path"])
        ckpts = [c | {"monitor": t.monitor} for c in state.topk]
        (out / "checkpoints.json").write_text(json.dumps(ckpts, indent=2) + "\n")
        if state.snapshots:  # train.snapshots: oof.checkpoints: snapshots ensembles them
            (out / "snapshots").mkdir()
            for snap in state.snapshots:
                shutil.copy2(t.work / snap["path"], out / "snapshots" / snap["path"])
            (out / "snapshots.json").write_text(json.dumps(state.snapshots, indent=2) + "\n")
        write_history(state.history, out / "history.csv")  # the fold's record (oof's curves)
    write_history(state.history, t.plots / "history.csv")
    plot_history(state.history, t.plots / "learning_curves.png", t.fold)
    overlays(t, model, held, size)
    log_fold_record(t.tracker, t.params, t.fold, result, len(state.history), t.log_model)
    t.tracker.end("FINISHED")
    if state.mlflow_run_id and not t.tracker.complete:  # `pneumoseg upload` completes it
        result["mlflow_incomplete"] = True
        log.warning(
            "train fold %d: MLflow run %s misses part of the record; `pneumoseg upload --fold "
            "%d` completes it once the store answers",
            t.fold,
            state.mlflow_run_id,
            t.fold,
        )
    write_json(Path(cfg.metrics_dir) / f"fold{t.fold}.json", result)
    t.store.clear()
    print(
        f"{t.stage_name}: fold {t.fold} done, final weights ({cfg.checkpoint.final}) on the "
        f"held-out fold: kaggle_dice {heldout['heldout_kaggle_dice']:.4f} (empty baseline "
        f"{heldout['heldout_empty_baseline']:.4f}), dice_pos {heldout['heldout_dice_pos']:.4f}"
        f" -> {t.out / 'model.pt'}; MLflow run {state.mlflow_run_id}"
    )
    return result


def log_fold_record(
    tracker: Tracker, params: Params, fold: int, result: dict[str, Any], step: int, model: bool
) -> None:
    """A fold's final metrics, tags and artifacts (plots, history, metrics file, model files,
    the train params and the environment) into its MLflow run."""
    cfg = params.train
    plots, out = Path(cfg.plots_dir) / f"fold{fold}", Path(cfg.models_dir) / f"fold{fold}"
    finals = {f"final_{k.removeprefix('val_')}": v for k, v in (result.get("final") or {}).items()}
    tracker.log_metrics_once(finals | (result.get("heldout") or {}), step=step)
    tags = {"best_epoch": str(result.get("best_epoch")), "final_weights": result["final_weights"]}
    tracker.set_tags(tags)
    for name in ("learning_curves.png", "val_overlays.png", "history.csv"):
        if (plots / name).is_file():
            tracker.log_artifact(plots / name, "plots")
    metrics_path = Path(cfg.metrics_dir) / f"fold{fold}.json"
    tracker.log_text(json.dumps(result, indent=2, sort_keys=True) + "\n", metrics_path.name)
    if model:
        for name in ("model.pt", "checkpoints.json"):
            if (out / name).is_file():
                tracker.log_artifact(out / name, "model")
    tracker.log_dict(stage_values(params, "train"), "params.yaml")
    for index, part in enumerate(cfg.parts):  # albumentations' own serialisation (A.from_dict)
        transform = A.to_dict(build_train_transform(cfg.augment, part.size))
        tracker.log_dict(transform, f"augment/part{index}_train_transform.json")
    tracker.log_text(pip_freeze() + "\n", "environment/requirements.txt")


@torch.no_grad()
def overlays(t: FoldTrainer, model: nn.Module, metrics: SegMetrics, size: int) -> Path:
    """Best and worst held-out cases of the final model as one PNG grid; with
    ``train.overlays: false`` a picture that only says so (no radiograph leaves the machine)."""
    if not t.cfg.overlays:
        return pixel_free_notice(t.plots / "val_overlays.png", "train.overlays: false")
    dice = metrics.per_image()
    order = np.argsort(dice, kind="stable")
    pick = list(dict.fromkeys([*order[:4].tolist(), *order[::-1][:4].tolist()]))
    ds = SegDataset(t.images.held_out, t.params.arrays.out_dir, size, t.cfg.model.in_channels)
    model.eval()
    cases = []
    for i in pick:
        x, y, _ = ds[i]
        logits, _ = forward(model, t.to_device(x[None]))
        prob = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
        image, _ = ds.load(i)
        cases.append((image, y[0].numpy(), prob >= t.cfg.val_threshold, float(dice[i])))
    return save_overlay_grid(cases, t.plots / "val_overlays.png")
