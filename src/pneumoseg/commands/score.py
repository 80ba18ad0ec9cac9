"""``pneumoseg score``: the Kaggle metric of any submission csv against a ground-truth csv
(rows unioned per image; an image missing from the submission counts as an empty
prediction), with the one Kaggle dice of :func:`pneumoseg.metrics.kaggle_dice`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.artifacts import native_size, read_manifest
from pneumoseg.metrics import kaggle_dice
from pneumoseg.params import Params
from pneumoseg.rle import decode_rows, read_rle_csv


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
    counts = []  # (tp, predicted, truth) pixels per image
    for image_id in gt.ids():
        h, w = (sizes or {}).get(image_id, default_size)
        g = gt.decode(image_id, h, w).astype(bool)
        if image_id in pred:
            p = decode_rows(pred.rows[image_id], h, w, pred.dialect, pred.source, image_id)
            p = p.astype(bool)
        else:
            p = np.zeros_like(g)
        counts.append((np.count_nonzero(p & g), np.count_nonzero(p), np.count_nonzero(g)))
    tp, predicted, truth_px = np.asarray(counts, dtype=np.int64).reshape(-1, 3).T
    arr = kaggle_dice(tp, predicted, truth_px)
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


def run(
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
