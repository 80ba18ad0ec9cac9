"""Stage ``oof``: predict every training image with the model of the fold that did not train
on it (see :mod:`pneumoseg.artifacts` for the files). The maps are at the size the models
predict (``oof.size: null``), the size at which submit and predict resize their probabilities
to the native resolution, so thresholds are tuned on exactly what inference thresholds.

With ``ensemble.members``, each member's maps are written too (``<oof>/members/<name>/``),
resized to the same size (members may train at other sizes); ``thresholds`` combines them."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.arrays import read_gray
from pneumoseg.artifacts import (
    MEMBERS_DIR,
    image_path,
    mask_path,
    open_oof_arrays,
    read_folds,
    stale_resume_state,
    write_learning_curves,
    write_oof_ids,
    write_oof_models,
)
from pneumoseg.files import staged_dir
from pneumoseg.inference import Ensemble, fold_model_files, to_uint8_probs
from pneumoseg.params import Params, finetuned_dir, member_dir
from pneumoseg.progress import progress_bar

log = logging.getLogger(__name__)


def run(params: Params, progress: bool = True) -> Path:
    """CLI/DVC entry: out-of-fold probability maps for every fold in ``train.folds``."""
    cfg = params.oof
    processed = params.data.processed_dir
    folds = read_folds(params.split.out)
    trained = list(params.train.folds)
    # rows follow train.folds in the order given, then ImageId: ids.csv and the arrays agree
    order = [(i, k) for k in trained for i in sorted(i for i, (f, _) in folds.items() if f == k)]
    untrained = sorted({f for f, _ in folds.values()} - set(trained))
    if untrained:
        log.info("oof: folds %s are not trained; their images are left out", untrained)
    models_dirs = {None: params.train.models_dir} | {
        name: member_dir(params.train.models_dir, name) for name in params.ensemble.members
    }
    work_dirs = {None: params.train.work_dir} | {
        name: member_dir(params.train.work_dir, name) for name in params.ensemble.members
    }
    size = cfg.size
    out = Path(cfg.out_dir)
    with staged_dir(out) as work:  # a kill or a full disk leaves the previous maps whole
        for member, models_dir in models_dirs.items():
            tuned = set(params.pseudo_label.folds) if member is None else set()
            ensembles = {
                k: Ensemble.of(fold_model_files(models_dir, k, cfg.checkpoints, k in tuned), cfg)
                for k in trained
            }
            for k, ensemble in ensembles.items():
                states = finetuned_dir(work_dirs[member]) if k in tuned else work_dirs[member]
                remove_finished_state(Path(states) / f"fold{k}", ensemble.metas[0])
            size = size or ensembles[trained[0]].size  # the train section's models' size
            folder = work if member is None else work / MEMBERS_DIR / member
            write_maps(folder, ensembles, order, processed, size, progress, member is None)
            write_oof_models(folder, {k: record(e) for k, e in ensembles.items()})
        write_oof_ids(work, order)
        missing = write_learning_curves(work, params.train.models_dir, trained)
        if missing:
            log.warning("oof: folds %s have no history.csv (trained before it was kept); "
                        "their learning curves are left out", missing)  # fmt: skip
    members = f" and members {list(params.ensemble.members)}" if params.ensemble.members else ""
    print(f"oof: {len(order)} images from folds {trained}{members} at {size}px -> {out}/probs.npy")
    return out


def remove_finished_state(work: Path, meta: dict[str, Any]) -> None:
    """Delete a fold's resume state that nothing will resume: one of the very params and data
    of the model in place (its training finished in another process, or DVC restored the fold
    from its cache after a stopped training), with one line saying so."""
    record = stale_resume_state(work, meta)
    if record is None:
        return
    size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
    shutil.rmtree(work, ignore_errors=True)
    log.warning(
        "oof: removed %s (%.0f MB): the resume state of a stopped training of fold %s with the "
        "params and data of the model in place, which will never resume (MLflow run %s stays "
        "as it ended)",
        work,
        size / 1e6,
        meta.get("fold"),
        record.get("mlflow_run_id"),
    )


def record(ensemble: Ensemble) -> dict[str, Any]:
    """What evaluate's provenance needs of one fold's models."""
    meta = ensemble.metas[0]
    out = {
        "files": [str(f) for f in ensemble.files],
        "selection": meta.get("selection", {"mode": "held_out"}),
        "mlflow_run_id": meta.get("mlflow_run_id"),
        "observe_heldout_every": meta.get("observe_heldout_every", 0),
    }
    if "pseudo_labels" in meta:  # a fine-tuned model (pseudo_label.folds)
        out |= {k: meta[k] for k in ("pseudo_labels", "finetuned_from")}
    return out


def write_maps(
    out: Path,
    ensembles: dict[int, Ensemble],
    order: list[tuple[str, int]],
    processed: str,
    size: int,
    progress: bool,
    with_masks: bool = True,
) -> None:
    """``probs.npy`` (and ``cls.npy``), with ``with_masks`` also ``masks.npy``, of the images
    in ``order``."""
    names = ("probs.npy", "masks.npy") if with_masks else ("probs.npy",)
    arrays = open_oof_arrays(out, len(order), size, names)
    probs = arrays[0]
    has_cls = all(e.has_cls for e in ensembles.values())
    cls_all = np.zeros(len(order), dtype=np.uint8) if has_cls else None
    bar = progress_bar(
        total=len(order), desc="oof" if with_masks else f"oof {out.name}", bars_allowed=progress
    )
    row = 0
    for k, ensemble in ensembles.items():
        images = ((i, read_gray(image_path(processed, i))) for i, f in order if f == k)
        for keys, p, cls in ensemble.predict_batches(images, size):
            probs[row : row + len(keys)] = to_uint8_probs(p)
            for j, image_id in enumerate(keys):
                if with_masks:
                    mask = read_gray(mask_path(processed, image_id), size, mask=True)
                    arrays[1][row + j] = mask > 127
            if cls is not None and cls_all is not None:
                cls_all[row : row + len(keys)] = to_uint8_probs(cls)
            row += len(keys)
            bar.update(len(keys))
    bar.close()
    for array in arrays:
        array.flush()
    del probs, arrays
    if cls_all is not None:
        np.save(out / "cls.npy", cls_all)
