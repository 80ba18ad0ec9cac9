"""Pneumothorax regions: crescents at the lung periphery with SIIM-like areas."""

from __future__ import annotations

import numpy as np

from pneumoseg.demo.canvas import Canvas

MIN_AREA, MAX_AREA = 0.0005, 0.08  # lesion area as a fraction of the image


def draw_lesion(
    rng: np.random.Generator,
    lung: np.ndarray,
    depth: np.ndarray,
    p0: np.ndarray,
    n_pixels: int,
) -> np.ndarray:
    """A crescent of exactly ``n_pixels`` lung pixels hugging the lung border around ``p0``.

    Lung pixels are ranked by ``depth / taper`` where depth is the distance to the lung border
    and the taper falls from 1 at ``p0`` to 0 at the crescent's half length; the lowest ranks
    form a sliver that is thickest at ``p0`` and thins out along the border.
    """
    size = lung.shape[0]
    k = rng.uniform(2.5, 5.5)  # half length / max thickness
    thickness = np.sqrt(3.0 * n_pixels / (4.0 * k))
    half_len = max(3.0, k * thickness)
    ys, xs = np.nonzero(lung)
    d = depth[ys, xs].astype(np.float64)
    for _ in range(8):
        r2 = ((xs - p0[0]) ** 2 + (ys - p0[1]) ** 2) / half_len**2
        inside = r2 < 1.0
        if inside.sum() >= n_pixels * 1.6 or half_len > size:
            break
        half_len *= 1.3
    taper = np.where(inside, 1.0 - r2, 0.0)
    score = np.where(inside, (d + 0.5) / np.maximum(taper, 1e-6), np.inf)
    n = min(n_pixels, int(np.isfinite(score).sum()))
    mask = np.zeros(lung.shape, dtype=bool)
    if n <= 0:
        return mask
    pick = np.argpartition(score, n - 1)[:n]
    mask[ys[pick], xs[pick]] = True
    return mask


def lesion_areas(rng: np.random.Generator, size: int) -> list[int]:
    """Pixel counts of 1-3 regions: log-normal areas (median ~0.8%), total within bounds."""
    n = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
    frac = np.exp(rng.normal(np.log(0.0095), 0.95, n))
    frac = np.clip(frac, MIN_AREA * 1.25, MAX_AREA * 0.92)
    total = frac.sum()
    if total > MAX_AREA * 0.92:
        frac = np.maximum(frac * (MAX_AREA * 0.92 / total), MIN_AREA * 1.25)
    pixels = size * size
    lo = int(np.ceil(MIN_AREA * pixels)) + 1
    return [max(lo, int(round(f * pixels))) for f in frac]


def pick_lesions(
    rng: np.random.Generator,
    canvas: Canvas,
    outlines: dict[int, tuple[np.ndarray, np.ndarray]],
    lung: np.ndarray,
    depth: np.ndarray,
) -> list[np.ndarray]:
    """1-3 pneumothorax regions along the apical/lateral/basal border of one (rarely both)
    lung; a region sometimes starts next to the previous one so that they overlap."""
    size = lung.shape[0]
    lesions: list[np.ndarray] = []
    side = int(rng.choice([-1, 1]))
    p0 = np.zeros(2)
    for i, n_px in enumerate(lesion_areas(rng, size)):
        if i > 0 and rng.random() < 0.35:
            p0 = p0 + rng.normal(0, 0.03 * size, 2)
        else:
            if i > 0 and rng.random() < 0.15:
                side = -side
            curve, labels = outlines[side]
            region = rng.choice(["apex", "lateral", "basal"], p=[0.4, 0.45, 0.15])
            cand = canvas.px(curve[labels == region])
            p0 = cand[rng.integers(len(cand))]
        mask = draw_lesion(rng, lung, depth, p0, n_px)
        if mask.any():
            lesions.append(mask)
    return lesions
