"""The triplet rule (see :mod:`pneumoseg.postprocess` for its semantics) and the
``postprocess.json`` it is tuned into: :class:`Triplet`, :func:`apply_triplet`,
:class:`PostProcess`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np


class ImageScorer(Protocol):
    """What scoring a triplet per image needs of a scorer (:class:`~pneumoseg.postprocess.scorer.
    TripletScorer` is one); this module sits below the scorer and does not import it."""

    n: int

    def indices(self, subset: np.ndarray | None) -> np.ndarray: ...

    def per_image(self, t: Triplet, subset: np.ndarray | None = None) -> np.ndarray: ...

    def predicted_pixels(self, t: Triplet, subset: np.ndarray | None = None) -> np.ndarray: ...


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


@dataclass
class PostProcess:
    """The tuned triplet(s) of ``postprocess.json``: one for every image, or one per group of
    a manifest field (``group_by``) with ``default`` for groups never seen in tuning."""

    default: Triplet
    group_by: str | None = None
    groups: dict[str, Triplet] = field(default_factory=dict)
    # ensemble members' weights (``member_weights``), None for one member
    weights: dict[str, float] | None = None

    @classmethod
    def load(cls, path: str | Path) -> PostProcess:
        """Read ``postprocess.json``; a one-line error names the file and the way out."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            default = Triplet(**{f: data[f] for f in Triplet.__dataclass_fields__})
            groups = {g: Triplet(**t) for g, t in (data.get("groups") or {}).items()}
            weights = data.get("member_weights")
            weights = None if weights is None else {str(k): float(v) for k, v in weights.items()}
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: not found (run `pneumoseg thresholds`)") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"{path}: not a valid postprocess.json ({type(exc).__name__}: {exc}); restore "
                "it with `dvc checkout` or rerun `dvc repro -f -s thresholds`"
            ) from None
        return cls(default, data.get("group_by"), groups, weights)

    def triplet(self, meta: Mapping[str, Any]) -> Triplet:
        """The triplet of an image with manifest/DICOM fields ``meta``."""
        if self.group_by is None:
            return self.default
        return self.groups.get(str(meta.get(self.group_by) or "unknown"), self.default)

    def per_image(
        self, scorer: ImageScorer, groups: np.ndarray | None, subset: np.ndarray | None = None
    ) -> np.ndarray:
        """Kaggle dice of each image of ``subset`` (all by default) with its triplet;
        ``groups``: the images' values of ``group_by`` (see :func:`group_labels`)."""
        return self._each(scorer, groups, subset, "per_image")

    def predicted_pixels(
        self, scorer: ImageScorer, groups: np.ndarray | None, subset: np.ndarray | None = None
    ) -> np.ndarray:
        """The predicted mask's pixel count (at the map size) of each image with its triplet."""
        return self._each(scorer, groups, subset, "predicted_pixels")

    def _each(
        self,
        scorer: ImageScorer,
        groups: np.ndarray | None,
        subset: np.ndarray | None,
        statistic: str,
    ) -> np.ndarray:
        if self.group_by is None or groups is None:
            return grouped_dice(scorer, None, {}, subset, self.default, statistic)
        return grouped_dice(scorer, groups, self.groups, subset, self.default, statistic)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self.default)
        if self.group_by is not None:
            out["group_by"] = self.group_by
            out["groups"] = {g: asdict(t) for g, t in self.groups.items()}
        if self.weights is not None:
            out["member_weights"] = dict(self.weights)
        return out


def grouped_dice(
    scorer: ImageScorer,
    groups: np.ndarray | None,
    triplets: Mapping[str, Triplet],
    subset: np.ndarray | None = None,
    default: Triplet | None = None,
    statistic: str = "per_image",
) -> np.ndarray:
    """Per-image Kaggle dice of ``subset`` (all images by default, in its order), each image
    with its group's triplet; a group without one gets ``default`` (an error without it).
    ``groups`` None: every image takes ``default`` (or the only triplet). ``statistic``: the
    scorer's per-image method to evaluate instead (``predicted_pixels``)."""
    per_image = getattr(scorer, statistic)
    idx = scorer.indices(subset)
    if groups is None:
        t = default if default is not None else next(iter(triplets.values()))
        return per_image(t, idx)
    groups = np.asarray(groups)
    if groups.shape != (scorer.n,):
        raise ValueError(f"groups must have shape ({scorer.n},), got {groups.shape}")
    out: np.ndarray | None = None
    for g in np.unique(groups[idx]):
        key = g.item() if isinstance(g, np.generic) else g
        t = triplets.get(key, default)
        if t is None:
            raise ValueError(f"no triplet for group {key!r}")
        mine = np.flatnonzero(groups[idx] == g)
        values = per_image(t, idx[mine])
        if out is None:
            out = np.empty(len(idx), dtype=values.dtype)
        out[mine] = values
    return out if out is not None else np.empty(0)


def score_grouped(scorer: ImageScorer, groups: np.ndarray, triplets: dict[str, Triplet]) -> float:
    """Mean Kaggle dice over ALL images, each image scored with its group's triplet.

    The score is additive over groups (``sum_g n_g / N * score_g(triplet_g)``, each term
    depending only on its own triplet), so searching each group on its own subset
    (``scorer.exhaustive(..., subset=groups == g)`` or one study per prefix) gives the joint
    optimum. Every group present in ``groups`` needs a triplet.
    """
    return float(grouped_dice(scorer, groups, triplets).mean())
