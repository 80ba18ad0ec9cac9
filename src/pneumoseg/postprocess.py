"""Triplet post-processing (SIIM-ACR 1st place) and fast threshold search on out-of-fold maps.

Inputs
------
``probs``: uint8 ``(N, S, S)`` probability maps stored as ``round(prob * 255)``; ``masks``:
``(N, S, S)`` ground truth, any non-zero pixel is positive; ``cls`` (optional): uint8 ``(N,)``
per-image classifier probabilities on the same 0..255 scale.

Threshold semantics (used everywhere in this module)
----------------------------------------------------
- A threshold ``t`` is a float in ``[0, 1]`` mapped to the uint8 level
  ``level(t) = int(round(t * 255))`` (Python ``round`` on the float64 product, i.e. ties go to
  the even level). Values outside ``[0, 1]`` raise ``ValueError``.
- A pixel is *above* ``t`` when ``prob_u8 > level(t)`` (strict), so comparisons happen on the
  stored uint8 scale: ``t = 0`` keeps every non-zero pixel, ``t = 1`` keeps nothing.
- The classifier gate predicts an empty mask when ``cls_u8 <= level(cls_gate)`` (the image is
  kept only when its classifier value is *above* the gate, same rule as pixels).

Area semantics
--------------
``min_area`` and ``min_component_area`` are in pixels at the *native* resolution (e.g. 2000 at
1024x1024). On an ``S x S`` map they become ``scale_area(a, S, native) =
ceil(a * S**2 / native**2)``, computed exactly with rationals (no float round-off). Because
pixel counts are integers, ``count < ceil(x)`` is the same as ``count < x``, so the ceiling is
the exact equivalent of comparing against the real-valued scaled area: no rounding bias in
either direction and the values transfer across training sizes.

The triplet rule (:func:`apply_triplet`, the reference semantics)
-----------------------------------------------------------------
1. gate (optional): ``cls_u8 <= level(cls_gate)`` -> empty;
2. if fewer than ``scale_area(min_area)`` pixels are above ``top_threshold`` -> empty;
3. otherwise mask = pixels above ``bottom_threshold``;
4. optional: drop 8-connected components of that mask with fewer than
   ``scale_area(min_component_area)`` pixels (0 = off); if nothing remains the mask is empty.

Scoring is the Kaggle mean per-image dice: ``2|P & G| / (|P| + |G|)``, and 1 when both are
empty. :class:`TripletScorer` reproduces :func:`kaggle_dice_naive` exactly (same integer counts,
same float formula) from per-image cumulative histograms.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    import optuna

N_LEVELS = 256
_HIST_EXACT_LIMIT = 2**24  # cv2.calcHist counts in float32: exact below this many pixels
_TIE_TOL = 1e-12  # exhaustive: scores within this of the max count as ties (first one wins)


def level(t: float) -> int:
    """uint8 level of threshold ``t`` in ``[0, 1]``: ``int(round(t * 255))``."""
    t = float(t)
    if not 0.0 <= t <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be in [0, 1], got {t}")
    return int(round(t * 255))


def scale_area(min_area: float, size: int, native: int) -> int:
    """``ceil(min_area * (size / native)**2)``: native-resolution pixels -> pixels on the map.

    Computed with exact rationals, so e.g. ``scale_area(900, 100, 300) == 100`` (float
    arithmetic would give 100.00000000000001 and a ceiling of 101).
    """
    if isinstance(min_area, np.generic):
        min_area = min_area.item()
    if not math.isfinite(min_area) or min_area < 0:
        raise ValueError(f"area must be finite and >= 0, got {min_area}")
    size, native = int(size), int(native)
    if size <= 0 or native <= 0:
        raise ValueError(f"size and native must be > 0, got {size}, {native}")
    return math.ceil(Fraction(min_area) * size * size / (native * native))


@dataclass(frozen=True)
class Triplet:
    """Post-processing parameters; thresholds in ``[0, 1]``, areas in native pixels."""

    top_threshold: float
    min_area: float
    bottom_threshold: float
    min_component_area: float = 0.0  # native pixels, 0 = off
    cls_gate: float | None = None  # None = off

    def __post_init__(self) -> None:
        level(self.top_threshold)
        level(self.bottom_threshold)
        if self.cls_gate is not None:
            level(self.cls_gate)
        for name in ("min_area", "min_component_area"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")


def _dice(tp: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Kaggle dice from pixel counts: ``2 tp / (pred + gt)``, 1.0 where ``pred + gt == 0``.

    Counts may be int64 or float64 holding integers (exact below 2**53): the quotient of the
    same two integers is correctly rounded either way, so every caller gets identical floats.
    """
    num = np.add(tp, tp, dtype=np.float64)
    den = np.add(pred, gt, dtype=np.float64)
    none = den == 0  # empty prediction on an empty mask: 1 / 1
    num += none
    den += none
    return num / den


_NO_BOX = (slice(0, 0), slice(0, 0))


def _components(binary: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """8-connected components of a 0/1 uint8 map: ``(box, labels, areas)``.

    Labelling runs on the bounding box of the foreground only (components never leave it, and
    it is much faster than labelling the whole map); ``labels`` covers ``binary[box]`` and
    ``areas[k]`` is the pixel count of label ``k`` (``areas[0]``, the background, is unused).
    """
    x, y, w, h = cv2.boundingRect(binary)
    if w == 0 or h == 0:
        return _NO_BOX, np.zeros((0, 0), np.int32), np.zeros(1, np.int64)
    box = (slice(y, y + h), slice(x, x + w))
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(binary[box]), connectivity=8, ltype=cv2.CV_32S
    )
    return box, labels, stats[:, cv2.CC_STAT_AREA].astype(np.int64)


def _check_map(prob_u8: np.ndarray) -> None:
    if prob_u8.dtype != np.uint8 or prob_u8.ndim != 2 or min(prob_u8.shape) < 1:
        raise ValueError(f"expected a uint8 (H, W) map, got {prob_u8.dtype} {prob_u8.shape}")


def apply_triplet(
    prob_u8: np.ndarray, t: Triplet, native: int, cls_u8: int | None = None
) -> np.ndarray:
    """Post-process one uint8 map into a uint8 0/1 mask (reference semantics). Areas scale by
    ``(map width / native width)**2``: an ``(S, S)`` OOF map of a ``native``-wide image, or a
    map at the native size itself (``native`` = its width, no scaling)."""
    _check_map(prob_u8)
    size = prob_u8.shape[1]
    empty = np.zeros(prob_u8.shape, dtype=np.uint8)
    if t.cls_gate is not None:
        if cls_u8 is None:
            raise ValueError("triplet has a cls_gate but no classifier value was given")
        if int(cls_u8) <= level(t.cls_gate):
            return empty
    if np.count_nonzero(prob_u8 > level(t.top_threshold)) < scale_area(t.min_area, size, native):
        return empty
    mask = (prob_u8 > level(t.bottom_threshold)).view(np.uint8)
    if t.min_component_area > 0:
        box, labels, areas = _components(mask)
        keep = areas >= scale_area(t.min_component_area, size, native)
        keep[0] = False  # background
        mask = empty
        mask[box] = keep.view(np.uint8)[labels]
    return mask


def _per_image_native(native: int | np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(native)
    if arr.ndim == 0:
        arr = np.full(n, int(arr), dtype=np.int64)
    if arr.shape != (n,):
        raise ValueError(f"native must be an int or an array of shape ({n},), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or (arr <= 0).any():
        raise ValueError("native sizes must be positive integers")
    return arr.astype(np.int64)


def kaggle_dice_naive(
    probs: np.ndarray,
    masks: np.ndarray,
    t: Triplet,
    native: int | np.ndarray,
    cls: np.ndarray | None = None,
) -> np.ndarray:
    """Per-image Kaggle dice of :func:`apply_triplet` on every map (reference, slow)."""
    n = len(probs)
    if len(masks) != n:
        raise ValueError(f"{n} maps but {len(masks)} masks")
    natives = _per_image_native(native, n)
    tp = np.zeros(n, dtype=np.int64)
    pred = np.zeros(n, dtype=np.int64)
    gt = np.zeros(n, dtype=np.int64)
    for i in range(n):
        p = apply_triplet(
            np.asarray(probs[i]), t, int(natives[i]), None if cls is None else int(cls[i])
        )
        g = np.asarray(masks[i]) != 0
        pred[i] = np.count_nonzero(p)
        gt[i] = np.count_nonzero(g)
        tp[i] = np.count_nonzero(g[p.view(bool)])
    return _dice(tp, pred, gt)


def _hist(img: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """256-bin int64 histogram of a uint8 map, optionally restricted to ``mask != 0``."""
    if img.size < _HIST_EXACT_LIMIT:
        h = cv2.calcHist([img], [0], mask, [N_LEVELS], [0, N_LEVELS])
        return np.rint(h.ravel()).astype(np.int64)
    values = img.ravel() if mask is None else img[mask != 0]
    return np.bincount(values, minlength=N_LEVELS).astype(np.int64)


class TripletScorer:
    """Precomputes per-image statistics once so one triplet costs O(N) vector ops, independent of S.

    For every image and level ``l`` in 0..255 it stores the number of pixels ``> l`` (all
    pixels and ground-truth pixels only) plus the ground-truth pixel count, as level-major
    ``(256, N)`` float64 arrays holding exact integers (``2 * 256 * 8`` bytes per image).
    Precompute streams the maps in chunks of ``batch`` images (``cv2.calcHist`` per image), so
    ``probs``/``masks`` may be ``np.memmap`` arrays.

    The histogram path (no ``min_component_area``) is the fast path. Component filtering cannot
    be derived from histograms: the first time a bottom level is requested with
    ``min_component_area > 0``, one pass over the maps runs ``cv2.connectedComponentsWithStats``
    (8-connectivity, on the foreground's bounding box, as :func:`apply_triplet` does) on
    ``probs[i] > level`` and caches every component's area and ground-truth overlap for that
    level (~16 bytes per component). The cache is per level, so any ``min_component_area`` at a
    level already seen costs only O(components) vector ops. The scorer keeps references to
    ``probs`` and ``masks`` for these passes (keep a memmap open while scoring).

    ``native`` is the native width (int, or one per image), used to scale the areas; ``gt`` holds
    the ground-truth pixel count per image.
    """

    def __init__(
        self,
        probs: np.ndarray,
        masks: np.ndarray,
        native: int | np.ndarray,
        cls: np.ndarray | None = None,
        batch: int = 256,
    ) -> None:
        if probs.dtype != np.uint8 or probs.ndim != 3 or probs.shape[1] != probs.shape[2]:
            raise ValueError(f"probs must be uint8 (N, S, S), got {probs.dtype} {probs.shape}")
        if masks.shape != probs.shape:
            raise ValueError(f"masks {masks.shape} != probs {probs.shape}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.n, self.size = int(probs.shape[0]), int(probs.shape[1])
        if self.n == 0:
            raise ValueError("no images")
        self.batch = int(batch)
        self._probs, self._masks = probs, masks
        self._native = _per_image_native(native, self.n)
        self._native_u, self._native_inv = np.unique(self._native, return_inverse=True)
        self._cls: np.ndarray | None = None
        if cls is not None:
            cls = np.asarray(cls)
            if cls.shape != (self.n,) or cls.dtype != np.uint8:
                raise ValueError(f"cls must be uint8 ({self.n},), got {cls.dtype} {cls.shape}")
            self._cls = cls.astype(np.int64)
        hist = np.zeros((self.n, N_LEVELS), dtype=np.int64)
        hist_gt = np.zeros((self.n, N_LEVELS), dtype=np.int64)
        for start, p, g in self._chunks():
            for j in range(len(p)):
                hist[start + j] = _hist(p[j], None)
                hist_gt[start + j] = _hist(p[j], g[j])
        self.gt = hist_gt.sum(axis=1)  # int64 ground-truth pixel counts
        # above[l, i] = #pixels of image i with value > l = total - #pixels with value <= l
        above = hist.sum(axis=1)[:, None] - hist.cumsum(axis=1)
        self._above = np.ascontiguousarray(above.T, dtype=np.float64)
        self._above_gt = np.ascontiguousarray((self.gt[:, None] - hist_gt.cumsum(axis=1)).T)
        self._above_gt = self._above_gt.astype(np.float64)
        self._gt_f = self.gt.astype(np.float64)
        self.has_cls = self._cls is not None
        self._area_cache: dict[float, int | np.ndarray] = {}
        self._cc_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def cls(self) -> np.ndarray | None:
        """Per-image classifier values (0..255) or None."""
        return self._cls

    def map(self, i: int) -> np.ndarray:
        """The uint8 probability map of image ``i``."""
        return np.asarray(self._probs[i])

    def truth(self, i: int) -> np.ndarray:
        """The 0/1 uint8 ground truth of image ``i``."""
        return (np.asarray(self._masks[i]) != 0).view(np.uint8)

    def _chunks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(start, probs chunk, 0/1 uint8 mask chunk)`` loaded into memory."""
        for start in range(0, self.n, self.batch):
            stop = min(start + self.batch, self.n)
            p = np.ascontiguousarray(self._probs[start:stop])
            g = (np.asarray(self._masks[start:stop]) != 0).view(np.uint8)
            yield start, p, g

    def _index(self, subset: np.ndarray | None) -> np.ndarray | slice:
        if subset is None:
            return slice(None)
        idx = np.asarray(subset)
        if idx.dtype == bool:
            if idx.shape != (self.n,):
                raise ValueError(f"boolean subset must have shape ({self.n},)")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError("subset must be 1-d integer indices or a boolean mask")
        if idx.size == 0:
            raise ValueError("empty subset")
        if idx.min() < -self.n or idx.max() >= self.n:
            raise ValueError("subset index out of range")
        return idx

    def scaled_area(self, area: float) -> np.ndarray | int:
        """``scale_area(area)`` per image (an int when every image has the same native size)."""
        key = float(area)
        out = self._area_cache.get(key)
        if out is None:
            values = [scale_area(area, self.size, int(nat)) for nat in self._native_u]
            out = values[0] if len(values) == 1 else np.asarray(values)[self._native_inv]
            if len(self._area_cache) >= 4096:
                self._area_cache.clear()
            self._area_cache[key] = out
        return out

    def _components_at(self, lvl: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cached ``(ptr (N+1,), areas (K,), gt overlaps (K,))`` of all components above lvl."""
        if lvl not in self._cc_cache:
            counts = np.zeros(self.n, dtype=np.int64)
            areas: list[np.ndarray] = []
            overlaps: list[np.ndarray] = []
            nonempty = self._above[lvl] > 0
            for start, p, g in self._chunks():
                for j in range(len(p)):
                    i = start + j
                    if not nonempty[i]:
                        continue
                    box, labels, area = _components((p[j] > lvl).view(np.uint8))
                    tp = np.zeros(area.size, dtype=np.int64)
                    if self.gt[i] > 0:
                        tp = np.bincount(labels[g[j][box].view(bool)], minlength=area.size)
                    counts[i] = area.size - 1
                    areas.append(area[1:])
                    overlaps.append(tp[1:].astype(np.int64))
            ptr = np.concatenate([[0], np.cumsum(counts)])
            empty = [np.zeros(0, dtype=np.int64)]
            self._cc_cache[lvl] = (
                ptr,
                np.concatenate(areas + empty),
                np.concatenate(overlaps + empty),
            )
        return self._cc_cache[lvl]

    def _filtered_counts(self, lvl: int, min_component_area: float) -> tuple[np.ndarray, ...]:
        """Per-image (pred, tp) counts above ``lvl`` after dropping small components."""
        ptr, areas, overlaps = self._components_at(lvl)
        thr = np.broadcast_to(self.scaled_area(min_component_area), (self.n,))
        keep = areas >= np.repeat(thr, np.diff(ptr))
        csum_p = np.concatenate([[0], np.cumsum(np.where(keep, areas, 0))])
        csum_t = np.concatenate([[0], np.cumsum(np.where(keep, overlaps, 0))])
        return csum_p[ptr[1:]] - csum_p[ptr[:-1]], csum_t[ptr[1:]] - csum_t[ptr[:-1]]

    def _gate(self, cls_gate: float | None, idx: np.ndarray | slice) -> np.ndarray | bool:
        if cls_gate is None:
            return False
        if self._cls is None:
            raise ValueError("triplet has a cls_gate but the scorer has no cls values")
        return self._cls[idx] <= level(cls_gate)

    def per_image(self, t: Triplet, subset: np.ndarray | None = None) -> np.ndarray:
        """Kaggle dice of every image (of ``subset``, in its order) under triplet ``t``."""
        idx = self._index(subset)
        top, bottom = level(t.top_threshold), level(t.bottom_threshold)
        area = self.scaled_area(t.min_area)
        if not isinstance(area, int):
            area = area[idx]
        keep = self._above[top, idx] >= area  # enough pixels above the top threshold
        if t.cls_gate is not None:
            keep &= ~self._gate(t.cls_gate, idx)
        if t.min_component_area > 0:
            pred, tp = self._filtered_counts(bottom, t.min_component_area)
            pred, tp = pred[idx], tp[idx]
        else:
            pred, tp = self._above[bottom, idx], self._above_gt[bottom, idx]
        return _dice(tp * keep, pred * keep, self._gt_f[idx])

    def score(self, t: Triplet, subset: np.ndarray | None = None) -> float:
        """Mean Kaggle dice over all images (or the ``subset`` indices)."""
        return float(self.per_image(t, subset).mean())

    def empty_baseline(self, subset: np.ndarray | None = None) -> float:
        """Score of predicting every mask empty (= fraction of empty ground-truth masks)."""
        return float((self.gt[self._index(subset)] == 0).mean())

    def exhaustive(
        self,
        areas: Sequence[float],
        subset: np.ndarray | None = None,
        top_levels: Sequence[int] = range(N_LEVELS),
        bottom_levels: Sequence[int] = range(N_LEVELS),
        *,
        cls_gate: float | None = None,
        min_component_area: float = 0.0,
        ordered: bool = False,
    ) -> tuple[Triplet, float, np.ndarray]:
        """Score every ``(area, top level, bottom level)``; return best triplet, score, array.

        With ``D[i, b]`` the dice of image ``i`` at bottom level ``b``, ``E[i]`` its dice when
        empty and ``Z[i, t]`` whether the (area, top) pair empties it, the mean score is
        ``(Z.T @ E)[t] + sum_i D[i, b] - (Z.T @ D)[t, b]`` over ``n``: one matrix product per
        area. The returned array has shape ``(len(areas), len(top_levels), len(bottom_levels))``
        (float round-off vs :meth:`score` ~1e-15). The best is the first entry in C order within
        1e-12 of the maximum (smallest area, then top, then bottom); with ``ordered=True`` only
        entries with ``bottom <= top`` compete (the array is still complete). Its score is
        recomputed exactly with :meth:`score`. An optional fixed ``cls_gate`` is applied to
        every entry; ``min_component_area`` is not supported (``ValueError``).
        """
        if min_component_area:
            raise ValueError("exhaustive searches the triplet only; min_component_area must be 0")
        tops, bottoms = np.asarray(top_levels, np.int64), np.asarray(bottom_levels, np.int64)
        for name, lv in (("top_levels", tops), ("bottom_levels", bottoms)):
            if lv.ndim != 1 or lv.size == 0 or lv.min() < 0 or lv.max() >= N_LEVELS:
                raise ValueError(f"{name} must be a non-empty sequence of levels in 0..255")
        area_list = [float(a) for a in areas]
        if not area_list:
            raise ValueError("areas must not be empty")
        idx = self._index(subset)
        gt = self.gt[idx]
        n = gt.size
        dice_empty = (gt == 0).astype(np.float64)  # E
        dice_b = _dice(self._above_gt[bottoms][:, idx], self._above[bottoms][:, idx], gt).T  # D
        dice_b_sum = dice_b.sum(axis=0)
        top_counts = self._above[tops][:, idx]  # (T, n)
        gate = self._gate(cls_gate, idx)
        scores = np.empty((len(area_list), tops.size, bottoms.size), dtype=np.float64)
        for a, area in enumerate(area_list):
            px = self.scaled_area(area)
            if not isinstance(px, int):
                px = px[idx]
            empty = ((top_counts < px) | gate).astype(np.float64)  # Z.T, (T, n)
            scores[a] = (empty @ dice_empty)[:, None] + dice_b_sum[None, :] - empty @ dice_b
        scores /= n
        allowed = bottoms[None, None, :] <= tops[None, :, None] if ordered else True
        masked = np.where(allowed, scores, -np.inf)
        if not np.isfinite(masked).any():
            raise ValueError("ordered=True but no bottom level is <= any top level")
        best = int(np.flatnonzero(masked >= masked.max() - _TIE_TOL)[0])
        a, ti, bi = np.unravel_index(best, scores.shape)
        triplet = Triplet(
            top_threshold=int(tops[ti]) / 255,
            min_area=area_list[a],
            bottom_threshold=int(bottoms[bi]) / 255,
            cls_gate=cls_gate,
        )
        return triplet, self.score(triplet, subset), scores


def gate_levels(gate_range: Sequence[float] | None, step: int = 5) -> list[float | None]:
    """Gates an exhaustive scan tries: ``None`` (off) plus every ``step``-th uint8 level of the
    ``(lo, hi)`` range (as thresholds ``level / 255``); just ``[None]`` without a range."""
    if gate_range is None:
        return [None]
    lo, hi = level(gate_range[0]), level(gate_range[1])
    return [None, *(lv / 255 for lv in range(lo, hi + 1, step))]


def exhaustive_best(
    scorer: TripletScorer,
    areas: Sequence[float],
    gates: Sequence[float | None] = (None,),
    subset: np.ndarray | None = None,
) -> tuple[Triplet, float]:
    """Best ordered (bottom <= top) triplet of :meth:`TripletScorer.exhaustive` over every
    classifier gate in ``gates`` (the first gate wins ties); its exact score."""
    best: tuple[Triplet, float] | None = None
    for gate in gates:
        t, s, _ = scorer.exhaustive(areas, subset=subset, cls_gate=gate, ordered=True)
        if best is None or s > best[1] + _TIE_TOL:
            best = (t, s)
    if best is None:
        raise ValueError("gates must not be empty")
    return best


def grouped_dice(
    scorer: TripletScorer,
    groups: np.ndarray | None,
    triplets: Mapping[str, Triplet],
    subset: np.ndarray | None = None,
    default: Triplet | None = None,
) -> np.ndarray:
    """Per-image Kaggle dice of ``subset`` (all images by default, in its order), each image
    with its group's triplet; a group without one gets ``default`` (an error without it).
    ``groups`` None: every image takes ``default`` (or the only triplet)."""
    idx = np.arange(scorer.n) if subset is None else np.asarray(scorer._index(subset))
    if isinstance(idx, slice):
        idx = np.arange(scorer.n)
    if groups is None:
        t = default if default is not None else next(iter(triplets.values()))
        return scorer.per_image(t, idx)
    groups = np.asarray(groups)
    if groups.shape != (scorer.n,):
        raise ValueError(f"groups must have shape ({scorer.n},), got {groups.shape}")
    dice = np.empty(len(idx), dtype=np.float64)
    for g in np.unique(groups[idx]):
        key = g.item() if isinstance(g, np.generic) else g
        t = triplets.get(key, default)
        if t is None:
            raise ValueError(f"no triplet for group {key!r}")
        mine = np.flatnonzero(groups[idx] == g)
        dice[mine] = scorer.per_image(t, idx[mine])
    return dice


def score_grouped(scorer: TripletScorer, groups: np.ndarray, triplets: dict[str, Triplet]) -> float:
    """Mean Kaggle dice over ALL images, each image scored with its group's triplet.

    The score is additive over groups (``sum_g n_g / N * score_g(triplet_g)``, each term
    depending only on its own triplet), so searching each group on its own subset
    (``scorer.exhaustive(..., subset=groups == g)`` or one study per prefix) gives the joint
    optimum. Every group present in ``groups`` needs a triplet.
    """
    return float(grouped_dice(scorer, groups, triplets).mean())


def oof_scorer(
    oof_dir: str | Path, processed_dir: str | Path
) -> tuple[TripletScorer, list[tuple[str, int]], dict[str, dict[str, str]]]:
    """A scorer over the OOF maps of ``oof_dir`` (native widths from the manifest), the
    (ImageId, fold) of every row and the manifest."""
    from pneumoseg.artifacts import load_oof, read_manifest

    oof = load_oof(oof_dir)
    manifest = read_manifest(processed_dir)
    native = np.array([int(manifest[i]["width"]) for i, _ in oof.ids])
    return TripletScorer(oof.probs, oof.masks, native, oof.cls), oof.ids, manifest


def group_labels(
    key: str | None, ids: Sequence[tuple[str, int]], manifest: Mapping[str, Mapping[str, str]]
) -> np.ndarray | None:
    """Per-image group labels (the manifest field ``key``; "unknown" when empty), or None."""
    if key is None:
        return None
    return np.array([manifest[i].get(key) or "unknown" for i, _ in ids])


# --- Optuna ----------------------------------------------------------------------------------


def search_space(space: Any, has_cls: bool) -> dict[str, Any]:
    """The :func:`suggest_triplet` space of a ``thresholds.space`` section (areas as integer
    ranges; the classifier gate only for models with a head)."""
    out: dict[str, Any] = {
        "top_threshold": tuple(space.top_threshold),
        "bottom_threshold": tuple(space.bottom_threshold),
        "min_area": (int(space.min_area[0]), int(space.min_area[1])),
    }
    if space.min_component_area is not None:
        lo, hi = space.min_component_area
        out["min_component_area"] = (int(lo), int(hi))
    if space.cls_gate is not None and has_cls:
        out["cls_gate"] = tuple(space.cls_gate)
    return out


_SPACE_KEYS = {"top_threshold", "bottom_threshold", "min_area", "min_component_area", "cls_gate"}
_REQUIRED = ("top_threshold", "bottom_threshold", "min_area")


def _range(space: Mapping[str, Any], key: str, integer: bool) -> tuple[Any, Any, int] | None:
    """``(lo, hi, step)`` of a space entry; a bare number is a fixed value (lo == hi)."""
    spec = space.get(key)
    if spec is None:
        return None
    if isinstance(spec, Real):
        spec = (spec, spec)
    spec = tuple(spec)
    if len(spec) not in (2, 3) or (len(spec) == 3 and not integer):
        raise ValueError(f"space[{key!r}] must be (lo, hi){' or (lo, hi, step)' * integer}")
    lo, hi, step = spec[0], spec[1], spec[2] if len(spec) == 3 else 1
    if integer:
        if any(float(v) != int(v) for v in (lo, hi, step)) or int(step) < 1 or lo < 0:
            raise ValueError(f"space[{key!r}] must be non-negative integers with step >= 1")
        lo, hi, step = int(lo), int(hi), int(step)
    else:
        lo, hi = float(lo), float(hi)
        for value in (lo, hi):
            level(value)  # validates [0, 1]
    if lo > hi:
        raise ValueError(f"space[{key!r}]: lo {lo} > hi {hi}")
    return lo, hi, step


def _build(
    space: Mapping[str, Any],
    prefix: str,
    get_float: Callable[[str, float, float], float],
    get_int: Callable[[str, int, int, int], int],
) -> Triplet:
    unknown = set(space) - _SPACE_KEYS
    missing = [k for k in _REQUIRED if space.get(k) is None]
    if unknown or missing:
        raise ValueError(f"space: unknown keys {sorted(unknown)}, missing keys {missing}")

    def flt(key: str) -> float | None:
        r = _range(space, key, integer=False)
        if r is None:
            return None
        return r[0] if r[0] == r[1] else get_float(prefix + key, r[0], r[1])

    def num(key: str) -> int:
        r = _range(space, key, integer=True)
        if r is None:
            return 0
        return r[0] if r[0] == r[1] else get_int(prefix + key, *r)

    top_lo = _range(space, "top_threshold", integer=False)[0]
    b_lo, b_hi, _ = _range(space, "bottom_threshold", integer=False)
    if b_lo > top_lo:
        raise ValueError(f"bottom_threshold lo {b_lo} > top_threshold lo {top_lo}: no room")
    top = flt("top_threshold")
    hi = min(b_hi, top)
    bottom = (
        b_lo if hi == b_lo else b_lo + get_float(prefix + "bottom_fraction", 0.0, 1.0) * (hi - b_lo)
    )
    return Triplet(
        top_threshold=top,
        min_area=float(num("min_area")),
        bottom_threshold=min(bottom, hi),
        min_component_area=float(num("min_component_area")),
        cls_gate=flt("cls_gate"),
    )


def suggest_triplet(trial: optuna.Trial, space: dict, prefix: str = "") -> Triplet:
    """Suggest a :class:`Triplet` from ``space`` (parameter names carry ``prefix``, e.g. "PA/").

    ``space`` keys: ``top_threshold``, ``bottom_threshold`` and ``cls_gate`` (optional) are
    ``(lo, hi)`` floats in [0, 1] (``suggest_float``, continuous; the scorer quantises them with
    :func:`level`); ``min_area`` and ``min_component_area`` (optional, 0 = off) are native pixels
    as ``(lo, hi)`` or ``(lo, hi, step)`` ints (``suggest_int``, linear, step 1 by default). A
    bare number fixes a value without suggesting it.

    ``bottom <= top`` is enforced by reparametrising: ``top`` is suggested, then
    ``{prefix}bottom_fraction`` in [0, 1] and ``bottom = lo + fraction * (min(hi, top) - lo)``,
    so every distribution is fixed (TPE models a stationary space) and no trial is wasted. This
    needs ``bottom lo <= top lo``. The bottom threshold is stored as the user attribute
    ``{prefix}bottom_threshold``; rebuild a triplet from ``study.best_params`` with
    :func:`triplet_from_params`.
    """

    def get_int(name: str, lo: int, hi: int, step: int) -> int:
        return trial.suggest_int(name, lo, hi, step=step)

    t = _build(space, prefix, trial.suggest_float, get_int)
    trial.set_user_attr(prefix + "bottom_threshold", t.bottom_threshold)
    return t


def triplet_from_params(params: Mapping[str, Any], space: dict, prefix: str = "") -> Triplet:
    """The :class:`Triplet` that :func:`suggest_triplet` built for these trial ``params``."""
    return _build(
        space, prefix, lambda name, lo, hi: params[name], lambda name, lo, hi, step: params[name]
    )


# --- postprocess.json ------------------------------------------------------------------------


@dataclass
class PostProcess:
    """The tuned triplet(s) of ``postprocess.json``: one for every image, or one per group of
    a manifest field (``group_by``) with ``default`` for groups never seen in tuning."""

    default: Triplet
    group_by: str | None = None
    groups: dict[str, Triplet] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> PostProcess:
        """Read ``postprocess.json``; a one-line error names the file and the way out."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            default = Triplet(**{f: data[f] for f in Triplet.__dataclass_fields__})
            groups = {g: Triplet(**t) for g, t in (data.get("groups") or {}).items()}
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: not found (run `pneumoseg thresholds`)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: not a valid postprocess.json ({type(exc).__name__}: {exc}); restore "
                "it with `dvc checkout` or rerun `dvc repro -f -s thresholds`"
            ) from None
        return cls(default, data.get("group_by"), groups)

    def triplet(self, meta: Mapping[str, Any]) -> Triplet:
        """The triplet of an image with manifest/DICOM fields ``meta``."""
        if self.group_by is None:
            return self.default
        return self.groups.get(str(meta.get(self.group_by) or "unknown"), self.default)

    def per_image(
        self, scorer: TripletScorer, groups: np.ndarray | None, subset: np.ndarray | None = None
    ) -> np.ndarray:
        """Kaggle dice of each image of ``subset`` (all by default) with its triplet;
        ``groups``: the images' values of ``group_by`` (see :func:`group_labels`)."""
        if self.group_by is None or groups is None:
            return grouped_dice(scorer, None, {}, subset, self.default)
        return grouped_dice(scorer, groups, self.groups, subset, self.default)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self.default)
        if self.group_by is not None:
            out["group_by"] = self.group_by
            out["groups"] = {g: asdict(t) for g, t in self.groups.items()}
        return out


# --- the search that `thresholds` deploys and `evaluate` cross-fits -----------------------------


@dataclass(frozen=True)
class SearchSettings:
    """How the triplet is tuned (the ``thresholds.*`` keys): an Optuna TPE study of
    ``trials`` trials over ``space`` (seeded), and, with ``exhaustive``, the whole uint8 grid
    of top x bottom for each of ``areas`` and classifier ``gates``; the better one is kept
    (per group with ``group_by``)."""

    trials: int
    seed: int
    space: dict[str, Any]
    exhaustive: bool
    areas: tuple[float, ...]
    gates: tuple[float | None, ...]
    group_by: str | None = None

    @classmethod
    def of(cls, cfg: Any, has_cls: bool) -> SearchSettings:
        """From a ``thresholds`` params section, for OOF maps with/without classifier values."""
        space = search_space(cfg.space, has_cls)
        return cls(
            trials=int(cfg.trials),
            seed=int(cfg.seed),
            space=space,
            exhaustive=bool(cfg.exhaustive),
            areas=tuple(float(a) for a in cfg.exhaustive_areas),
            gates=tuple(gate_levels(space.get("cls_gate"))),
            group_by=cfg.group_by,
        )


def _subset(scorer: TripletScorer, subset: np.ndarray | None) -> np.ndarray:
    return np.arange(scorer.n) if subset is None else np.asarray(subset)


def search_objective(
    scorer: TripletScorer,
    space: dict[str, Any],
    groups: np.ndarray | None = None,
    subset: np.ndarray | None = None,
) -> Callable[[optuna.Trial], float]:
    """The study's objective: mean Kaggle dice over ``subset`` of the suggested triplet (one
    per group present in ``subset``, parameters prefixed ``<group>/``)."""
    idx = _subset(scorer, subset)
    names = None if groups is None else sorted({str(g) for g in np.asarray(groups)[idx]})

    def objective(trial: optuna.Trial) -> float:
        if names is None:
            return scorer.score(suggest_triplet(trial, space), idx)
        triplets = {g: suggest_triplet(trial, space, f"{g}/") for g in names}
        return float(grouped_dice(scorer, groups, triplets, idx).mean())

    return objective


def select_triplets(
    study: optuna.Study,
    scorer: TripletScorer,
    settings: SearchSettings,
    groups: np.ndarray | None = None,
    subset: np.ndarray | None = None,
) -> tuple[PostProcess, dict[str, Any]]:
    """The deployed choice on ``subset``: the study's best triplet or, when better, the grid's
    (per group: the score adds up over groups, so each group keeps its better one; the default
    triplet, for groups never seen, is the ungrouped grid optimum). Returns the post-processing
    and a report (``score``, ``selected``, ``optuna_best_score``, ``exhaustive`` ...)."""
    idx = _subset(scorer, subset)
    report: dict[str, Any] = {"optuna_best_score": float(study.best_value)}
    t0 = time.perf_counter()
    if groups is None:
        best = triplet_from_params(study.best_params, settings.space)
        post, score, selected = PostProcess(best), float(study.best_value), "optuna"
        report["optuna"] = asdict(best)
        if settings.exhaustive:
            ex_best, ex_score = exhaustive_best(scorer, settings.areas, settings.gates, idx)
            report["exhaustive"] = asdict(ex_best) | {"score": ex_score}
            if ex_score > score:
                post, score, selected = PostProcess(ex_best), ex_score, "exhaustive"
    else:
        labels = np.asarray(groups)
        names = sorted({str(g) for g in labels[idx]})
        default = exhaustive_best(scorer, settings.areas, settings.gates, idx)[0]
        chosen: dict[str, Triplet] = {}
        picked: dict[str, str] = {}
        candidates: dict[str, dict[str, Any]] = {}
        for g in names:
            mine = idx[labels[idx] == g]
            chosen[g] = triplet_from_params(study.best_params, settings.space, f"{g}/")
            picked[g] = "optuna"
            candidates[g] = {"optuna": asdict(chosen[g])}
            if settings.exhaustive:
                ex_best, ex_score = exhaustive_best(scorer, settings.areas, settings.gates, mine)
                candidates[g]["exhaustive"] = asdict(ex_best)
                if ex_score > scorer.score(chosen[g], mine):
                    chosen[g], picked[g] = ex_best, "exhaustive"
        post = PostProcess(default, settings.group_by, chosen)
        score = float(grouped_dice(scorer, labels, chosen, idx).mean())
        kinds = set(picked.values())
        selected = kinds.pop() if len(kinds) == 1 else "mixed"
        report["group_selected"] = picked
        report["group_candidates"] = candidates
        report["group_sizes"] = {g: int((labels[idx] == g).sum()) for g in names}
        if settings.exhaustive:
            report["exhaustive"] = {"score": score}
    if "exhaustive" in report:
        report["exhaustive"] |= {
            "areas": list(settings.areas),
            "gates": len(settings.gates),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    report |= {"score": score, "selected": selected}
    return post, report


def tune(
    scorer: TripletScorer,
    settings: SearchSettings,
    groups: np.ndarray | None = None,
    subset: np.ndarray | None = None,
) -> tuple[PostProcess, dict[str, Any]]:
    """The whole deployed search on ``subset`` with a fresh in-memory study (cross-fitting)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=settings.seed, multivariate=True),
    )
    study.optimize(search_objective(scorer, settings.space, groups, subset), settings.trials)
    return select_triplets(study, scorer, settings, groups, subset)
