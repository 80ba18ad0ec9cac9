"""Stage ``submit``: predict the test images with the fold ensemble + TTA + tuned triplet and
write a Kaggle submission (``ImageId,EncodedPixels``, one row per image, ``-1`` = empty)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from pneumoseg.arrays import read_gray
from pneumoseg.artifacts import (
    image_path,
    native_size,
    output_dialect,
    read_manifest,
    read_test_order,
)
from pneumoseg.files import atomic_file
from pneumoseg.params import Params
from pneumoseg.progress import progress_bar
from pneumoseg.rle import rle_encode

log = logging.getLogger(__name__)


def run(params: Params, progress: bool = True) -> Path:
    """CLI/DVC entry: write ``submit.out`` for the test images of the manifest, in the order of
    the competition's sample submission when ``convert`` found one."""
    from pneumoseg.inference import Ensemble, ensemble_members, predict_masks
    from pneumoseg.postprocess import PostProcess

    processed = params.data.processed_dir
    dialect = output_dialect(params.submit.dialect, processed)
    manifest = read_manifest(processed)
    test = sorted(i for i, r in manifest.items() if r["split"] == "test")
    post = PostProcess.load(params.thresholds.out)
    cfg = params.train
    members = ensemble_members(
        cfg.models_dir,
        cfg.folds,
        params.oof.checkpoints,
        params.ensemble.members,
        params.pseudo_label.folds,
    )
    ens = Ensemble.of([f for _, f in members], params.oof, weights=post.weights)
    items = (
        (i, read_gray(image_path(processed, i)), native_size(manifest[i]), manifest[i])
        for i in test
    )
    rles: dict[str, str] = {}
    predictions = predict_masks(ens, post, items)
    for pred in progress_bar(predictions, total=len(test), desc="submit", bars_allowed=progress):
        rles[pred.image_id] = rle_encode(pred.mask, dialect)
    sample = read_test_order(processed)
    order = sample if sample is not None else test
    missing = [i for i in order if i not in rles]
    extra = sorted(set(rles) - set(order))
    if missing:
        log.warning(
            "submit: %d images of the sample submission have no prediction (failed "
            "conversion?): written as -1, first: %s",
            len(missing),
            missing[0],
        )
    if extra:
        log.warning(
            "submit: %d predicted images are not in the sample submission; left out", len(extra)
        )
    out = Path(params.submit.out)
    with atomic_file(out, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ImageId", "EncodedPixels"])
        writer.writerows((i, rles.get(i, "-1")) for i in order)
    positive = sum(rles.get(i, "-1") != "-1" for i in order)
    print(
        f"submit: {len(order)} images ({positive} with pneumothorax, {len(missing)} missing) "
        f"-> {out} [{dialect} RLE]"
    )
    return out
