"""Stage ``pseudo_label@<fold>`` (optional: one per fold in ``pseudo_label.folds``): fold k's
own final model predicts the test images as submit would (the ``oof`` section's TTA), and the
images it is confident about become fold k's extra training set (:mod:`pneumoseg.pseudo`).
Only fold k's model: the other folds' models trained on fold k's held-out images, and their
labels would carry those images into fold k's OOF score. The test images' truth (the demo's
``test-truth.csv``) is never read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.arrays import read_gray, resize_gray
from pneumoseg.artifacts import image_path, read_manifest
from pneumoseg.files import staged_dir
from pneumoseg.params import Params
from pneumoseg.progress import progress_bar
from pneumoseg.pseudo import EMPTY, LEFT_OUT, POSITIVE, label_maps, write_pseudo_set


def run(params: Params, fold: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """CLI/DVC entry: pseudo-label the test images for ``fold`` (or every listed fold)."""
    folds = [fold] if fold is not None else list(params.pseudo_label.folds)
    return [label_fold(params, k, progress) for k in folds]


def label_fold(params: Params, fold: int, progress: bool) -> dict[str, Any]:
    """Write ``<pseudo_label.out_dir>/fold<k>/``; returns its ``pseudo.json``."""
    from pneumoseg.inference import Ensemble, fold_model_files

    cfg, processed = params.pseudo_label, params.data.processed_dir
    test = sorted(i for i, row in read_manifest(processed).items() if row["split"] == "test")
    files = fold_model_files(params.train.models_dir, fold)
    ensemble = Ensemble.of(files, params.oof)
    size = ensemble.size
    small: dict[str, np.ndarray] = {}  # each image at the model's size, until labelled

    def images() -> Any:
        for image_id in test:
            image = read_gray(image_path(processed, image_id))
            small[image_id] = resize_gray(image, size)
            yield image_id, image

    rows: list[tuple[str, str, float]] = []
    kept_images: list[np.ndarray] = []
    kept_masks: list[np.ndarray] = []
    bar = progress_bar(total=len(test), desc=f"pseudo_label fold{fold}", bars_allowed=progress)
    for keys, probs, _ in ensemble.predict_batches(images(), size):
        labels, masks, peaks = label_maps(
            probs,
            cfg.positive_confidence,
            cfg.negative_confidence,
            cfg.pixel_threshold,
            cfg.positive_min_area,
        )
        for image_id, label, mask, peak in zip(keys, labels, masks, peaks, strict=True):
            image = small.pop(image_id)
            rows.append((image_id, label, float(peak)))
            if label != LEFT_OUT:
                kept_images.append(image)
                kept_masks.append(mask)
        bar.update(len(keys))
    bar.close()
    count = {label: sum(r[1] == label for r in rows) for label in (POSITIVE, EMPTY, LEFT_OUT)}
    summary = {
        "fold": fold,
        "labelled_by": [str(f) for f in files],
        "labelled_by_run": ensemble.metas[0].get("mlflow_run_id"),
        "size": size,
        "tta": {k: v for k, v in ensemble.describe().items() if k.startswith("tta_")},
        "positive_confidence": cfg.positive_confidence,
        "negative_confidence": cfg.negative_confidence,
        "pixel_threshold": cfg.pixel_threshold,
        "positive_min_area": cfg.positive_min_area,
        "n_test": len(rows),
        "n_positive": count[POSITIVE],
        "n_empty": count[EMPTY],
        "n_left_out": count[LEFT_OUT],
    }
    out = Path(cfg.out_dir) / f"fold{fold}"
    shape = (0, size, size)
    with staged_dir(out) as work:  # a kill or a full disk leaves the previous labels whole
        images_array = np.stack(kept_images) if kept_images else np.zeros(shape, np.uint8)
        masks_array = np.stack(kept_masks) if kept_masks else np.zeros(shape, np.uint8)
        write_pseudo_set(work, rows, images_array, masks_array, summary)
    print(
        f"pseudo_label: fold {fold}'s model labelled {len(rows)} test images: "
        f"{count[POSITIVE]} positive (max probability >= {cfg.positive_confidence}, "
        f"area >= {cfg.positive_min_area} px), "
        f"{count[EMPTY]} empty (< {cfg.negative_confidence}), {count[LEFT_OUT]} left out -> {out}"
    )
    return summary
