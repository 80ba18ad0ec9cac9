"""Independent recomputations on a project's OOF set, for tests that check what a stage did.

The deployed maps of an ensemble are the members' maps averaged with the weights the stage
chose (``postprocess.json``'s ``member_weights``, or a held-out fold's refitted weights in
``evaluate.json``), as documented: weights scaled to sum to 1, ``sum w * map`` in float32 in
the order of the weights, rounded to the nearest uint8. Written here with plain numpy, not with
the package's blend, so a test compares the stage against a second implementation.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@dataclass
class OofRows:
    """The OOF rows of a project: ids, folds, native widths and manifest rows, in row order."""

    ids: list[str]
    folds: np.ndarray
    native: np.ndarray
    manifest: list[dict[str, str]]
    masks: np.ndarray

    def field(self, name: str) -> np.ndarray:
        """A manifest column per row ("unknown" when empty, as the grouping does)."""
        return np.array([row.get(name) or "unknown" for row in self.manifest])


def oof_rows(project: Path) -> OofRows:
    by_id = {r["ImageId"]: r for r in csv_rows(project / "data/processed/manifest.csv")}
    rows = csv_rows(project / "oof/ids.csv")
    ids = [r["ImageId"] for r in rows]
    return OofRows(
        ids=ids,
        folds=np.array([int(r["fold"]) for r in rows]),
        native=np.array([int(by_id[i]["width"]) for i in ids]),
        manifest=[by_id[i] for i in ids],
        masks=np.load(project / "oof/masks.npy"),
    )


def member_maps(project: Path) -> dict[str, np.ndarray]:
    """Every member's OOF maps: ``main`` (oof/probs.npy) and each ``oof/members/<name>``."""
    maps = {"main": np.load(project / "oof/probs.npy")}
    for path in sorted((project / "oof/members").glob("*/probs.npy")):
        maps[path.parent.name] = np.load(path)
    return maps


def blended(maps: dict[str, np.ndarray], weights: dict[str, float] | None) -> np.ndarray:
    """The maps a stage scores with ``weights`` (None: a single model's maps)."""
    if not weights:
        assert list(maps) == ["main"], f"members {sorted(maps)} but no weights"
        return maps["main"]
    assert set(weights) == set(maps), (sorted(weights), sorted(maps))
    total = float(sum(weights.values()))
    acc = np.zeros(maps["main"].shape, dtype=np.float32)
    for name, w in weights.items():
        if w > 0:
            acc = acc + maps[name].astype(np.float32) * np.float32(float(w) / total)
    return np.clip(np.rint(acc), 0, 255).astype(np.uint8)


def deployed_maps(project: Path, weights: dict[str, float] | None) -> np.ndarray:
    return blended(member_maps(project), weights)
