"""Pseudo-labels: the test images one fold's model is confident about, as an extra training set
for that same fold (stage ``pseudo_label@<fold>`` writes them, ``finetune@<fold>`` trains on
them; README "Pseudo-labels" gives the leakage rules).

An image is *positive* when its largest pixel probability reaches
``pseudo_label.positive_confidence`` (its mask: the pixels at or above ``pixel_threshold``),
*empty* when its largest pixel probability stays below ``negative_confidence``, and *left out*
otherwise; ``positive_min_area`` > 0 also asks a positive for that many mask pixels (at the
model's size). Layout of ``<pseudo_label.out_dir>/fold<k>/``::

    ids.txt, arrays.json,     the labelled images and masks at the model's size, in the layout
    <size>/images.npy, ...    of :mod:`pneumoseg.arrays` (so training reads them like its own)
    labels.csv                every test image: ImageId, label, max_prob
    pseudo.json               the counts, the thresholds and the model that labelled them
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.arrays import save_rows

POSITIVE, EMPTY, LEFT_OUT = "positive", "empty", "left_out"
LABELS, SUMMARY = "labels.csv", "pseudo.json"


def label_maps(
    probs: np.ndarray, positive: float, negative: float, pixel: float, min_area: int = 0
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per probability map of ``probs`` (B, S, S) in [0, 1]: its label, its 0/1 uint8 mask
    (empty unless positive) and its largest probability. A positive also needs ``min_area``
    mask pixels."""
    peaks = probs.reshape(len(probs), -1).max(axis=1) if len(probs) else np.zeros(0)
    masks = (probs >= pixel).astype(np.uint8)
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    labels = [
        POSITIVE if p >= positive and a >= min_area else EMPTY if p < negative else LEFT_OUT
        for p, a in zip(peaks, areas, strict=True)
    ]
    masks[[label != POSITIVE for label in labels]] = 0
    return labels, masks, peaks


def write_pseudo_set(
    folder: Path,
    rows: list[tuple[str, str, float]],
    images: np.ndarray,
    masks: np.ndarray,
    summary: dict[str, Any],
) -> None:
    """``rows``: (ImageId, label, max_prob) of every test image; ``images``/``masks``: those
    of the labelled rows (not left out), in order."""
    kept = [i for i, label, _ in rows if label != LEFT_OUT]
    save_rows(folder, kept, images, masks)
    with (folder / LABELS).open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["ImageId", "label", "max_prob"])
        out.writerows((i, label, f"{peak:.4f}") for i, label, peak in rows)
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class PseudoSet:
    """One fold's pseudo-labelled test images: ``ids`` (in the folder's arrays), whether each
    is ``positive``, and ``summary`` (``pseudo.json``)."""

    folder: Path
    ids: list[str]
    positive: np.ndarray
    summary: dict[str, Any]

    @classmethod
    def read(cls, folder: str | Path, fold: int) -> PseudoSet:
        root = Path(folder)
        if not (root / SUMMARY).is_file() or not (root / LABELS).is_file():
            raise FileNotFoundError(
                f"{root / SUMMARY}: not found; run `dvc repro pseudo_label@{fold}` "
                f"(or `pneumoseg pseudo_label --fold {fold}`)"
            )
        with (root / LABELS).open(newline="") as fh:
            labelled = [(r["ImageId"], r["label"]) for r in csv.DictReader(fh)]
        kept = [(i, label == POSITIVE) for i, label in labelled if label != LEFT_OUT]
        summary = json.loads((root / SUMMARY).read_text())
        return cls(root, [i for i, _ in kept], np.array([p for _, p in kept], bool), summary)
