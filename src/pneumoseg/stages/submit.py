"""Stage ``submit``: predict the test images with the fold ensemble + TTA + tuned triplet and
write a Kaggle submission (``ImageId,EncodedPixels``, one row per image, ``-1`` = empty).
Also ``pneumoseg score``: the Kaggle metric of any submission against a ground-truth csv."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pneumoseg.data import read_gray
from pneumoseg.params import Params
from pneumoseg.postprocess import Triplet, apply_triplet
from pneumoseg.rle import decode_rows, read_rle_csv, rle_encode
from pneumoseg.stages.thresholds import load_postprocess, read_manifest

log = logging.getLogger(__name__)


@dataclass
class PostProcess:
    """The tuned triplet(s) and the map size they were tuned at."""

    default: Triplet
    group_by: str | None
    groups: dict[str, Triplet]
    size: int

    @classmethod
    def load(cls, path: str | Path) -> PostProcess:
        default, group_by, groups = load_postprocess(path)
        size = int(json.loads(Path(path).read_text())["size"])
        return cls(default, group_by, groups, size)

    def triplet(self, meta: dict[str, Any]) -> Triplet:
        if self.group_by is None:
            return self.default
        return self.groups.get(str(meta.get(self.group_by) or "unknown"), self.default)


@dataclass
class Prediction:
    image_id: str
    mask: np.ndarray  # uint8 0/1 at native height x width
    prob_u8: np.ndarray  # (S, S) map the triplet was applied to
    cls_u8: int | None


def predict_masks(
    ensemble: Any,
    post: PostProcess,
    items: Iterable[tuple[str, np.ndarray, tuple[int, int], dict[str, Any]]],
) -> Iterator[Prediction]:
    """``(ImageId, uint8 image, (native h, w), meta)`` -> post-processed native-size masks.

    The triplet is applied on the S x S map (S = the size it was tuned at, areas scaled from
    the native width), then the mask is resized nearest-neighbour to the native size.
    """
    from pneumoseg.inference import to_uint8_probs

    pending: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}

    def images() -> Iterator[tuple[str, np.ndarray]]:
        for image_id, image, native, meta in items:
            pending[image_id] = (native, meta)
            yield image_id, image

    for keys, probs, cls in ensemble.predict_batches(images(), post.size):
        probs_u8 = to_uint8_probs(probs)
        cls_u8 = to_uint8_probs(cls) if cls is not None else None
        for j, image_id in enumerate(keys):
            (h, w), meta = pending.pop(image_id)
            c = int(cls_u8[j]) if cls_u8 is not None else None
            mask = apply_triplet(probs_u8[j], post.triplet(meta), w, c)
            native = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
            yield Prediction(image_id, native, probs_u8[j], c)


def _sample_ids(params: Params) -> tuple[list[str] | None, Path | None]:
    path = params.submit.sample_submission
    candidate = Path(path) if path else Path(params.data.raw_dir) / "sample_submission.csv"
    if not candidate.is_file():
        if path:
            raise FileNotFoundError(f"submit.sample_submission: {path} not found")
        return None, None
    with candidate.open(newline="") as fh:
        return [r[0].strip() for r in list(csv.reader(fh))[1:] if r], candidate


def run(params: Params, progress: bool = True) -> Path:
    """CLI/DVC entry: write ``submit.out`` for the test images of the manifest."""
    from pneumoseg.inference import Ensemble, fold_model_files

    manifest = read_manifest(Path(params.data.processed_dir) / "manifest.csv")
    test = sorted(i for i, r in manifest.items() if r["split"] == "test")
    post = PostProcess.load(params.thresholds.out)
    files = [
        f
        for k in params.train.folds
        for f in fold_model_files(params.train.models_dir, k, params.oof.checkpoints)
    ]
    ens = Ensemble(files, tta_hflip=params.oof.tta_hflip, batch_size=params.oof.batch_size)
    root = Path(params.data.processed_dir) / "images"
    items = (
        (
            i,
            read_gray(root / f"{i}.png", params.data.size),
            (int(manifest[i]["height"]), int(manifest[i]["width"])),
            manifest[i],
        )
        for i in test
    )
    rles: dict[str, str] = {}
    for pred in tqdm(
        predict_masks(ens, post, items), total=len(test), desc="submit", disable=not progress
    ):
        rles[pred.image_id] = rle_encode(pred.mask, params.submit.dialect)
    sample, sample_path = _sample_ids(params)
    order = sample if sample is not None else test
    missing = [i for i in order if i not in rles]
    extra = sorted(set(rles) - set(order))
    if missing:
        log.warning(
            "submit: %d images of %s have no prediction (failed conversion?): written as -1, "
            "first: %s",
            len(missing),
            sample_path,
            missing[0],
        )
    if extra:
        log.warning("submit: %d predicted images are not in %s; left out", len(extra), sample_path)
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
    manifest_path = Path(params.data.processed_dir) / "manifest.csv"
    sizes = None
    if manifest_path.is_file():
        sizes = {
            i: (int(r["height"]), int(r["width"])) for i, r in read_manifest(manifest_path).items()
        }
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
