"""Ensemble members combined on their OOF maps: weighted means and the fit of the weights.

Each member's maps (uint8 ``(N, S, S)``, see :mod:`pneumoseg.postprocess`) are averaged with
weights that sum to 1 and rounded back to uint8 (:class:`WeightedMaps`, computed per chunk on
access, so a :class:`TripletScorer` streams it like a memmap). A member alone is the weight 1
on it: its maps come back unchanged.

The weights are fitted (:func:`fit_weights`) on a grid of the simplex (multiples of
``ensemble.weight_step``), whose candidates always include the equal-weight mean and every
member alone; each candidate scores the exhaustive triplet optimum of its blended maps (the
grid of :meth:`TripletScorer.exhaustive`), and the first best wins (equal weights, then each
member alone, then the grid). The weighted ensemble therefore never scores below its best
member on the images its weights were fitted on. ``evaluate`` cross-fits the fit.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumoseg.artifacts import OofSet
from pneumoseg.params import MAIN
from pneumoseg.postprocess.scorer import TripletScorer, exhaustive_best
from pneumoseg.postprocess.search import SearchSettings

_TIE_TOL = 1e-12


def normalised(weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` scaled to sum to 1 (a ValueError for negative or all-zero weights)."""
    total = float(sum(weights.values()))
    if any(w < 0 for w in weights.values()) or total <= 0:
        raise ValueError(f"member weights must be >= 0 and not all 0, got {dict(weights)}")
    return {name: float(w) / total for name, w in weights.items()}


class WeightedMaps:
    """``round(sum_m w_m * maps_m)`` as uint8, computed for the rows asked (``[i]``,
    ``[a:b]``, an index array); members with weight 0 are not read."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, maps: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> None:
        if set(weights) != set(maps):
            raise ValueError(f"weights for {sorted(weights)}, maps of {sorted(maps)}")
        shapes = {tuple(m.shape) for m in maps.values()}
        if len(shapes) != 1:
            raise ValueError(f"member maps differ in shape: {sorted(shapes)}")
        self.weights = normalised(weights)
        self._parts = [(maps[name], w) for name, w in self.weights.items() if w > 0]
        self.shape = shapes.pop()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if len(self._parts) == 1:
            return np.asarray(self._parts[0][0][key])
        return weighted_u8([(maps[key], w) for maps, w in self._parts])


def blended_cls(
    cls: Mapping[str, np.ndarray | None], weights: Mapping[str, float]
) -> np.ndarray | None:
    """The members' classifier values (uint8 per image) averaged with ``weights`` as the maps
    are; None unless every weighted member has them."""
    used = {name: w for name, w in normalised(weights).items() if w > 0}
    if any(cls.get(name) is None for name in used):
        return None
    return weighted_u8([(cls[name], w) for name, w in used.items()])


def weighted_u8(parts: Sequence[tuple[Any, float]]) -> np.ndarray:
    """``round(sum w * values)`` of uint8 arrays as uint8 (float32 sums, as inference adds)."""
    acc = sum(np.asarray(values, dtype=np.float32) * np.float32(w) for values, w in parts)
    return np.clip(np.rint(acc), 0, 255).astype(np.uint8)


def weight_grid(names: Sequence[str], step: float) -> list[dict[str, float]]:
    """The candidates of the fit: the equal-weight mean, each member alone, then every point
    of the simplex whose weights are multiples of ``step`` (duplicates dropped)."""
    units = max(1, round(1 / step))
    equal = {n: 1 / len(names) for n in names}
    out = [equal, *({n: float(n == m) for n in names} for m in names)]
    for cut in itertools.combinations(range(units + len(names) - 1), len(names) - 1):
        bounds = (-1, *cut, units + len(names) - 1)
        counts = [bounds[i + 1] - bounds[i] - 1 for i in range(len(names))]
        out.append({n: c / units for n, c in zip(names, counts, strict=True)})
    unique: list[dict[str, float]] = []
    for w in out:
        if not any(all(abs(w[n] - u[n]) < 1e-9 for n in names) for u in unique):
            unique.append(w)
    return unique


@dataclass(frozen=True)
class WeightFit:
    """The fitted weights on one set of images, their score and every candidate's."""

    weights: dict[str, float]
    score: float
    candidates: list[dict[str, Any]]  # {"weights": ..., "score": ...} in grid order

    def alone(self, name: str) -> float:
        """The score of member ``name`` alone."""
        return next(c["score"] for c in self.candidates if c["weights"][name] == 1.0)

    @property
    def equal(self) -> float:
        return float(self.candidates[0]["score"])


def blended_scorer(
    maps: Mapping[str, np.ndarray],
    masks: np.ndarray,
    native: int | np.ndarray,
    cls: Mapping[str, np.ndarray | None],
    weights: Mapping[str, float],
) -> TripletScorer:
    """A scorer over the members' maps averaged with ``weights``."""
    return TripletScorer(
        WeightedMaps(maps, weights),  # type: ignore[arg-type]
        masks,
        native,
        blended_cls(cls, weights),
    )


def oof_members(oof: OofSet) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """Every member's OOF maps and classifier values, the train section's (``main``) first."""
    maps = {MAIN: oof.probs, **oof.members}
    return maps, {MAIN: oof.cls, **oof.member_cls}


def fit_weights(
    maps: Mapping[str, np.ndarray],
    masks: np.ndarray,
    native: int | np.ndarray,
    cls: Mapping[str, np.ndarray | None],
    settings: SearchSettings,
    step: float,
    subsets: Mapping[Any, np.ndarray | None],
) -> dict[Any, WeightFit]:
    """For each named ``subset`` of images (None: all), the grid candidate whose blended maps
    score best (exhaustive triplet optimum over ``settings.areas`` and gates). Each candidate's
    scorer is built once and scored on every subset."""
    grid = weight_grid(list(maps), step)
    scores: dict[Any, list[float]] = {key: [] for key in subsets}
    for weights in grid:
        scorer = blended_scorer(maps, masks, native, cls, weights)
        gates = settings.gates if scorer.has_cls else (None,)
        for key, subset in subsets.items():
            scores[key].append(exhaustive_best(scorer, settings.areas, gates, subset)[1])
    fits = {}
    for key, values in scores.items():
        best = int(np.flatnonzero(np.asarray(values) >= max(values) - _TIE_TOL)[0])
        table = [{"weights": w, "score": s} for w, s in zip(grid, values, strict=True)]
        fits[key] = WeightFit(grid[best], values[best], table)
    return fits
