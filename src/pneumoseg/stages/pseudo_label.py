"""Stage ``pseudo_label@<fold>`` (optional: one per fold in ``pseudo_label.folds``): fold k's
own final model predicts the test images as submit would (the ``oof`` section's TTA), and the
images it is confident about become fold k's extra training set (:mod:`pneumoseg.pseudo`).
Only fold k's model: the other folds' models trained on fold k's held-out images, and their
labels would carry those images into fold k's OOF score. The test images' truth (the demo's
``test-truth.csv``) is never read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoseg.arrays import read_gray, resize_gray
from pneumoseg.artifacts import image_path, read_manifest
from pneumoseg.files import new_memmap, staged_dir
from pneumoseg.params import Params, PseudoLabelParams
from pneumoseg.progress import progress_bar
from pneumoseg.pseudo import EMPTY, LEFT_OUT, POSITIVE, label_maps, write_pseudo_set

if TYPE_CHECKING:
    from pneumoseg.inference import Ensemble


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
    out = Path(cfg.out_dir) / f"fold{fold}"
    with staged_dir(out) as work:  # a kill or a full disk leaves the previous labels whole
        # each kept image and mask goes to disk as soon as it is labelled (memory stays one
        # batch whatever the test set's size), then into the arrays' layout
        scratch = [work / f".kept-{kind}.npy" for kind in ("images", "masks")]
        kept = [new_memmap(path, (max(len(test), 1), size, size)) for path in scratch]
        rows = label_rows(ensemble, processed, test, cfg, kept, fold, progress)
        count = {label: sum(r[1] == label for r in rows) for label in (POSITIVE, EMPTY, LEFT_OUT)}
        n_kept = len(rows) - count[LEFT_OUT]
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
        write_pseudo_set(work, rows, kept[0][:n_kept], kept[1][:n_kept], summary)
        del kept
        for path in scratch:
            path.unlink()
    print(
        f"pseudo_label: fold {fold}'s model labelled {len(rows)} test images: "
        f"{count[POSITIVE]} positive (max probability >= {cfg.positive_confidence}, "
        f"area >= {cfg.positive_min_area} px), "
        f"{count[EMPTY]} empty (< {cfg.negative_confidence}), {count[LEFT_OUT]} left out -> {out}"
    )
    return summary


def label_rows(
    ensemble: Ensemble,
    processed: str,
    test: list[str],
    cfg: PseudoLabelParams,
    kept: list[np.ndarray],
    fold: int,
    progress: bool,
) -> list[tuple[str, str, float]]:
    """Predict and label every test image; each kept image (at the model's size) and its mask
    is written into the next row of ``kept`` (images, masks). Returns (ImageId, label,
    max_prob) of every test image, in order."""
    size = ensemble.size
    small: dict[str, np.ndarray] = {}  # each image at the model's size, until labelled

    def images() -> Any:
        for image_id in test:
            image = read_gray(image_path(processed, image_id))
            small[image_id] = resize_gray(image, size)
            yield image_id, image

    rows: list[tuple[str, str, float]] = []
    n_kept = 0
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
                kept[0][n_kept], kept[1][n_kept] = image, mask
                n_kept += 1
        bar.update(len(keys))
    bar.close()
    return rows
