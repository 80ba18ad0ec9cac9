"""Stratified, seeded image splits: the cross-validation folds (stage ``split``) and, inside a
fold, the images that train, the images that make its training decisions and the held-out
images OOF scores (``train.selection``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class SplitError(ValueError):
    """Images that cannot be split as asked."""


def stratified_folds(labels: dict[str, int], n_folds: int, seed: int) -> dict[str, int]:
    """Assign folds so each has (nearly) the same count of each label; same seed, same folds."""
    if len(labels) < n_folds:
        raise SplitError(f"{len(labels)} training images cannot fill {n_folds} folds")
    rng = np.random.default_rng(seed)
    folds: dict[str, int] = {}
    offset = 0
    for label in sorted(set(labels.values())):
        ids = sorted(i for i, v in labels.items() if v == label)
        order = rng.permutation(len(ids))
        for rank, idx in enumerate(order):
            folds[ids[idx]] = (offset + rank) % n_folds
        offset += len(ids)  # continue the round robin so fold sizes stay balanced overall
    return folds


def inner_split(labels: dict[str, int], fraction: float, seed: int) -> list[str]:
    """A stratified, seeded ``fraction`` of the images (at least one of each label that has
    two or more images), sorted: the same labels, fraction and seed give the same images."""
    rng = np.random.default_rng([seed % 2**32, 7919])  # a stream apart from the folds' draw
    chosen: list[str] = []
    for label in sorted(set(labels.values())):
        ids = sorted(i for i, v in labels.items() if v == label)
        n = min(len(ids) - 1, max(1, round(fraction * len(ids))))
        chosen += [ids[k] for k in rng.permutation(len(ids))[:n]]
    return sorted(chosen)


@dataclass(frozen=True)
class FoldImages:
    """The images of one fold's training: ``train`` fit the weights, ``select`` make its
    decisions (empty with ``selection.mode: none``), ``held_out`` are what OOF scores."""

    train: list[str]
    select: list[str]
    held_out: list[str]

    @classmethod
    def of(
        cls, folds: dict[str, tuple[int, int]], fold: int, mode: str, fraction: float, seed: int
    ) -> FoldImages:
        """``folds``: ImageId -> (fold, has_mask) as in ``folds.csv``; ``mode``, ``fraction``:
        ``train.selection``; ``seed``: ``train.seed`` (the split also depends on the fold)."""
        held_out = sorted(i for i, (f, _) in folds.items() if f == fold)
        rest = {i: m for i, (f, m) in folds.items() if f != fold}
        if not held_out or not rest:
            raise SplitError(f"fold {fold} leaves an empty training or held-out set")
        if mode == "held_out":
            return cls(sorted(rest), held_out, held_out)
        if mode == "none":
            return cls(sorted(rest), [], held_out)
        select = inner_split(rest, fraction, seed + 7 * fold)
        chosen = set(select)
        return cls(sorted(i for i in rest if i not in chosen), select, held_out)
