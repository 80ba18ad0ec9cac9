"""Stage ``submit``: predict the test images with the fold ensemble + TTA + tuned triplet and
write a Kaggle submission (``ImageId,EncodedPixels``, one row per image, ``-1`` = empty).
Also ``pneumoseg score``: the Kaggle metric of any submission against a ground-truth csv."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pneumoseg.artifacts import image_path, native_size, read_manifest, read_test_order
from pneumoseg.data import read_gray
from pneumoseg.params import Params
from pneumoseg.rle import decode_rows, read_rle_csv, rle_encode

log = logging.getLogger(__name__)


def run(params: Params, progress: bool = True) -> Path:
    """CLI/DVC entry: write ``submit.out`` for the test images of the manifest, in the order of
    the competition's sample submission when ``convert`` found one."""
    from pneumoseg.inference import Ensemble, fold_model_files, predict_masks
    from pneumoseg.postprocess import PostProcess

    processed = params.data.processed_dir
    manifest = read_manifest(processed)
    test = sorted(i for i, r in manifest.items() if r["split"] == "test")
    post = PostProcess.load(params.thresholds.out)
    files = [
        f
        for k in params.train.folds
        for f in fold_model_files(params.train.models_dir, k, params.oof.checkpoints)
    ]
    ens = Ensemble(files, tta_hflip=params.oof.tta_hflip, batch_size=params.oof.batch_size)
    items = (
        (i, read_gray(image_path(processed, i)), native_size(manifest[i]), manifest[i])
        for i in test
    )
    rles: dict[str, str] = {}
    for pred in tqdm(
        predict_masks(ens, post, items), total=len(test), desc="submit", disable=not progress
    ):
        rles[pred.image_id] = rle_encode(pred.mask, params.submit.dialect)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ImageId", "EncodedPixels"])
        writer.writerows((i, rles.get(i, "-1")) for i in order)
    positive = sum(rles.get(i, "-1") != "-1" for i in order)
    print(
        f"submit: {len(order)} images ({positive} with pneumothorax, {len(missing)} missing) "
        f"-> {out} [{params.submit.dialect} RLE]"
    )
    return out


def score_submission(
    submission: str | Path,
    truth: str | Path,
    sizes: dict[str, tuple[int, int]] | None = None,
    default_size: tuple[int, int] = (1024, 1024),
    dialect: str = "auto",
) -> dict[str, Any]:
    """Kaggle mean dice of a submission over the ImageIds of ``truth`` (rows unioned per image;
    an image missing from the submission counts as an empty prediction)."""
    pred = read_rle_csv(submission, dialect)
    gt = read_rle_csv(truth, "auto")
    dice = []
    for image_id in gt.ids():
        h, w = (sizes or {}).get(image_id, default_size)
        g = gt.decode(image_id, h, w).astype(bool)
        if image_id in pred:
            p = decode_rows(pred.rows[image_id], h, w, pred.dialect, pred.source, image_id)
            p = p.astype(bool)
        else:
            p = np.zeros_like(g)
        denom = p.sum() + g.sum()
        dice.append(1.0 if denom == 0 else 2.0 * (p & g).sum() / denom)
    arr = np.asarray(dice)
    positive = np.asarray([any(r.strip() != "-1" for _, r in gt.rows[i]) for i in gt.ids()])
    return {
        "kaggle_dice": float(arr.mean()) if arr.size else 0.0,
        "n_images": int(arr.size),
        "n_positive": int(positive.sum()),
        "empty_baseline": float((~positive).mean()) if arr.size else 0.0,
        "missing": sum(i not in pred for i in gt.ids()),
        "extra": sum(i not in gt for i in pred.ids()),
        "dialect": pred.dialect,
    }


def run_score(
    params: Params,
    submission: str,
    truth: str,
    json_out: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """CLI entry of ``pneumoseg score`` (native sizes from the manifest when available)."""
    sizes = None
    if (Path(params.data.processed_dir) / "manifest.csv").is_file():
        sizes = {i: native_size(r) for i, r in read_manifest(params.data.processed_dir).items()}
    result = score_submission(submission, truth, sizes, dialect="auto")
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"score: kaggle_dice {result['kaggle_dice']:.4f} over {result['n_images']} images "
            f"({result['n_positive']} positive; empty baseline {result['empty_baseline']:.4f}; "
            f"{result['missing']} missing, {result['extra']} extra)"
        )
    return result
