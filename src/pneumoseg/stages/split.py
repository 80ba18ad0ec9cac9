"""Stage ``split``: stratified, seeded K-fold assignment of the training images."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from pneumoseg.artifacts import MANIFEST, check_unique_ids, write_folds
from pneumoseg.folds import SplitError, stratified_folds
from pneumoseg.params import Params


def read_train_labels(manifest: str | Path) -> dict[str, int]:
    """ImageId -> has_mask (0/1) for the training rows of a manifest."""
    labels: dict[str, int] = {}
    with Path(manifest).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    check_unique_ids(rows, manifest)
    for line_no, row in enumerate(rows, start=2):
        if row.get("split") != "train":
            continue
        if row.get("has_mask") not in ("0", "1"):
            raise SplitError(f"{manifest} line {line_no}: has_mask must be 0 or 1")
        labels[row["ImageId"]] = int(row["has_mask"])
    return labels


def run(params: Params, progress: bool = True) -> dict[str, int]:
    """CLI/DVC entry: split ``<processed_dir>/manifest.csv`` into ``split.out``."""
    manifest = Path(params.data.processed_dir) / MANIFEST
    if not manifest.is_file():
        raise SplitError(f"{manifest}: not found (run `pneumoseg convert` first)")
    labels = read_train_labels(manifest)
    folds = stratified_folds(labels, params.split.n_folds, params.split.seed)
    write_folds(params.split.out, folds, labels)
    sizes = Counter(folds.values())
    positives = Counter(f for i, f in folds.items() if labels[i])
    per_fold = ", ".join(
        f"{k}: {sizes[k]} ({positives[k]} pos)" for k in range(params.split.n_folds)
    )
    n = params.split.n_folds
    print(f"split: {len(folds)} images into {n} folds -> {params.split.out} [{per_fold}]")
    return dict(sizes)
