"""Exact, fast scoring of triplets on out-of-fold maps: :class:`TripletScorer` (per-image
cumulative histograms, one triplet = O(N) vector operations), the exhaustive uint8 grid and the
naive reference it reproduces."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from pneumoseg.metrics import kaggle_dice
from pneumoseg.postprocess.components import (
    ComponentTable,
    build_table,
    cached_table,
)
from pneumoseg.postprocess.triplet import Triplet, apply_triplet, level, scale_area

N_LEVELS = 256
_HIST_EXACT_LIMIT = 2**24  # cv2.calcHist counts in float32: exact below this many pixels
_TIE_TOL = 1e-12  # exhaustive: scores within this of the max count as ties (first one wins)
# Working folder (relative to the current directory, like checkpoints/) of the OOF maps'
# component tables, shared by the stages that score them (thresholds, evaluate).
COMPONENTS_CACHE = ".pneumoseg/components"


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
    return kaggle_dice(tp, pred, gt)


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
    be derived from histograms: the first triplet with ``min_component_area > 0`` builds a
    :class:`~pneumoseg.postprocess.components.ComponentTable` in one pass over the maps (one
    max-tree per map: every 8-connected component of ``probs[i] > l`` at every level ``l``, with
    its area and ground-truth overlap). ``components_cache`` (a folder and the maps' key, see
    :func:`~pneumoseg.postprocess.components.file_fingerprint`) keeps that table on disk for the
    next scorer of the same maps (``thresholds``, then ``evaluate``). A level's
    components are then a vector selection, cached per level, so any ``min_component_area``
    costs O(components) vector ops. The scorer keeps references to ``probs`` and ``masks`` for
    that pass (keep a memmap open while scoring).

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
        components_cache: tuple[Path, str] | None = None,
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
        self._components_cache = components_cache
        self._table: ComponentTable | None = None

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

    def indices(self, subset: np.ndarray | None) -> np.ndarray:
        """The integer indices of ``subset`` (indices or a boolean mask; None: every image)."""
        idx = self._index(subset)
        return np.arange(self.n) if isinstance(idx, slice) else idx

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

    @property
    def components(self) -> ComponentTable:
        """Every component of every map at every level (built on first use, or read from the
        ``components_cache`` folder when it holds the table of these maps)."""
        if self._table is None:

            def build() -> ComponentTable:
                return build_table(self._chunks(), self.n)

            if self._components_cache is None:
                self._table = build()
            else:
                folder, key = self._components_cache
                self._table = cached_table(folder, key, build)
            if self._table.n != self.n:
                raise ValueError(f"component table of {self._table.n} maps for {self.n} maps")
        return self._table

    def _components_at(self, lvl: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cached ``(ptr (N+1,), areas (K,), gt overlaps (K,))`` of all components above lvl."""
        if lvl not in self._cc_cache:
            self._cc_cache[lvl] = self.components.at(lvl)
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
        tp, pred, gt = self.counts(t, subset)
        return kaggle_dice(tp, pred, gt)

    def predicted_pixels(self, t: Triplet, subset: np.ndarray | None = None) -> np.ndarray:
        """The predicted mask's pixel count (at the map size) of every image under ``t``."""
        return self.counts(t, subset)[1].astype(np.int64)

    def max_level(self) -> np.ndarray:
        """Each image's largest map value (0..255): the number of levels with a pixel above."""
        return (self._above > 0).sum(axis=0).astype(np.int64)

    def counts(
        self, t: Triplet, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per image (of ``subset``): true-positive, predicted and ground-truth pixel counts
        under triplet ``t`` (float64 holding exact integers)."""
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
        return tp * keep, pred * keep, self._gt_f[idx]

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
        tp_b, pred_b = self._above_gt[bottoms][:, idx], self._above[bottoms][:, idx]
        dice_b = kaggle_dice(tp_b, pred_b, gt).T  # D
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
    grids: dict[float | None, np.ndarray] | None = None,
) -> tuple[Triplet, float]:
    """Best ordered (bottom <= top) triplet of :meth:`TripletScorer.exhaustive` over every
    classifier gate in ``gates`` (the first gate wins ties); its exact score. ``grids``, when
    given, receives each gate's full score array (for the heatmap)."""
    best: tuple[Triplet, float] | None = None
    for gate in gates:
        t, s, grid = scorer.exhaustive(areas, subset=subset, cls_gate=gate, ordered=True)
        if grids is not None:
            grids[gate] = grid
        if best is None or s > best[1] + _TIE_TOL:
            best = (t, s)
    if best is None:
        raise ValueError("gates must not be empty")
    return best


def group_labels(
    key: str | None, ids: Sequence[tuple[str, int]], manifest: Mapping[str, Mapping[str, str]]
) -> np.ndarray | None:
    """Per-image group labels (the manifest field ``key``; "unknown" when empty), or None."""
    if key is None:
        return None
    return np.array([manifest[i].get(key) or "unknown" for i, _ in ids])
