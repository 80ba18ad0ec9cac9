"""Drawing primitives of the synthetic radiographs: shapes in normalised coordinates through
one per-image affine transform, blurs, splines and smooth noise."""

from __future__ import annotations

import cv2
import numpy as np


class Canvas:
    """Draws shapes given in normalised coordinates through one per-image affine transform."""

    SHIFT = 4  # sub-pixel bits for cv2 drawing

    def __init__(self, size: int, angle: float, scale: float, shift: tuple[float, float]):
        self.size = size
        c, s = np.cos(angle), np.sin(angle)
        self.mat = scale * np.array([[c, -s], [s, c]])
        self.offset = np.array([0.5, 0.5]) + np.asarray(shift)

    def px(self, pts: np.ndarray) -> np.ndarray:
        """Normalised (N, 2) points (x, y) -> float pixel coordinates."""
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        return ((pts - 0.5) @ self.mat.T + self.offset) * self.size

    def _fixed(self, pts: np.ndarray) -> np.ndarray:
        return np.round(self.px(pts) * (1 << self.SHIFT)).astype(np.int32)

    def fill(self, polys: list[np.ndarray]) -> np.ndarray:
        """Filled anti-aliased polygons as float32 coverage in [0, 1]."""
        canvas = np.zeros((self.size, self.size), np.uint8)
        cv2.fillPoly(canvas, [self._fixed(p) for p in polys], 255, cv2.LINE_AA, self.SHIFT)
        return canvas.astype(np.float32) / 255.0

    def mask(self, polys: list[np.ndarray]) -> np.ndarray:
        """Filled polygons as a uint8 0/1 mask (no anti-aliasing)."""
        canvas = np.zeros((self.size, self.size), np.uint8)
        cv2.fillPoly(canvas, [self._fixed(p) for p in polys], 1, cv2.LINE_8, self.SHIFT)
        return canvas

    def lines(
        self, groups: list[list[np.ndarray]], widths: list[float], values: list[float]
    ) -> np.ndarray:
        """Groups of open polylines (one width and value per group, widths normalised) drawn
        into a float32 layer; where lines cross, the brightest wins.

        Lines thinner than a pixel are drawn one pixel wide with their value scaled down
        (partial volume), so thin structures fade instead of vanishing at small sizes.
        """
        out = np.zeros((self.size, self.size), np.float32)
        scale = self.size * float(np.linalg.norm(self.mat[0]))
        merged: dict[tuple[int, float], list[np.ndarray]] = {}
        for paths, width, value in zip(groups, widths, values, strict=True):
            w_px = width * scale
            key = (max(1, int(round(w_px))), round(float(value) * min(1.0, w_px), 4))
            merged.setdefault(key, []).extend(paths)
        for (thick, val), paths in sorted(merged.items(), key=lambda kv: kv[0][1]):
            lengths = {len(p) for p in paths}
            if len(lengths) == 1:  # one array, one transform
                fixed = self._fixed(np.asarray(paths, dtype=np.float64))
                pts = list(fixed.reshape(len(paths), lengths.pop(), 2))
            else:
                pts = [self._fixed(p) for p in paths]
            cv2.polylines(out, pts, False, (val,), thick, cv2.LINE_8, self.SHIFT)
        return out


def smooth(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with sigma in pixels; larger sigmas run on a downscaled copy (fast)."""
    if sigma <= 0.3:
        return arr
    size = arr.shape[0]
    if sigma > 3.0:
        small_n = max(8, int(round(size * 2.0 / sigma)))
        small = cv2.resize(arr, (small_n, small_n), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(
            small, (0, 0), sigma * small_n / size, borderType=cv2.BORDER_REFLECT
        )
        return cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(arr, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def closed_spline(points: np.ndarray, per_segment: int = 16) -> np.ndarray:
    """Closed Catmull-Rom curve through ``points`` (N, 2)."""
    p = np.asarray(points, dtype=np.float64)
    p0, p1, p2, p3 = np.roll(p, 1, 0), p, np.roll(p, -1, 0), np.roll(p, -2, 0)
    t = np.linspace(0, 1, per_segment, endpoint=False)[None, :, None]
    a, b, c, d = (x[:, None, :] for x in (p0, p1, p2, p3))
    curve = 0.5 * (
        2 * b + (-a + c) * t + (2 * a - 5 * b + 4 * c - d) * t**2 + (-a + 3 * b - 3 * c + d) * t**3
    )
    return curve.reshape(-1, 2)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise (std ~1) with about ``cells`` blobs across the image."""
    cells = max(2, min(cells, size))
    small = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(small, (size + size * 3 // cells, size + size * 3 // cells), cv2.INTER_CUBIC)
    off = size * 3 // cells // 2
    out = big[off : off + size, off : off + size]
    return out / max(float(out.std()), 1e-6)


# Right lung (image left) outline: (|dx| from the midline, y) with a label per control point.
