"""Stage ``demo``: a synthetic, SIIM-ACR-like pneumothorax data set written as real DICOM files.

The real SIIM data cannot be downloaded here, so the pipeline's default data set is generated:
procedural frontal chest radiographs (body, lungs, mediastinum and heart, clavicles, ribs,
diaphragm, lung vessels, devices and markers, exposure/gamma/illumination/noise) with
pneumothorax crescents at the lung periphery on ``positive_fraction`` of the images.

Layout (as in the competition)::

    <out>/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm
    <out>/dicom-images-test/...
    <out>/train-rle.csv          ImageId, EncodedPixels   (relative RLE, one row per region)
    <out>/test-truth.csv         same format, the hidden truth of the test images
    <out>/sample_submission.csv  ImageId,EncodedPixels    (every test image "-1")

The DICOMs mix what a converter meets in the wild: 8-bit JPEG Baseline (most, like SIIM),
uncompressed, RLE Lossless, JPEG 2000 Lossless, MONOCHROME1, 12-16-bit pixels with and
without a VOI window, and filled-in (fake, greppable) identifying patient tags. Every format
of an image decodes - correctly - to the same picture. Everything is seeded: one seed, the
same bytes.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from tqdm import tqdm

from pneumoseg.params import DemoParams
from pneumoseg.rle import rle_encode

if TYPE_CHECKING:
    from pydicom.dataset import FileDataset

    from pneumoseg.params import Params

TRAIN_DIR = "dicom-images-train"
TEST_DIR = "dicom-images-test"
TRAIN_CSV = "train-rle.csv"
TRUTH_CSV = "test-truth.csv"
SUBMISSION_CSV = "sample_submission.csv"
RLE_HEADER = ("ImageId", " EncodedPixels")  # SIIM's header has the leading space

INSTITUTION = "DEMO GENERAL HOSPITAL"
UID_ROOT = "1.2.276.0.7230010.3.1"  # the root of SIIM's UIDs
UID_SITE = "8323329"
MIN_AREA, MAX_AREA = 0.0005, 0.08  # lesion area as a fraction of the image

# Pixel formats: name -> share of the images. Every format appears at least once in a split
# with at least len(FORMATS) images.
FORMATS: dict[str, float] = {
    "jpeg8": 0.60,  # 8-bit MONOCHROME2, JPEG Baseline (like SIIM)
    "raw8": 0.15,  # 8-bit MONOCHROME2, Explicit VR Little Endian
    "rle8": 0.05,  # 8-bit MONOCHROME2, RLE Lossless
    "rle16": 0.05,  # 16-bit MONOCHROME2, RLE Lossless, rescale + window
    "mono1_raw": 0.05,  # 12-bit MONOCHROME1 (inverted), window, uncompressed
    "mono1_j2k": 0.05,  # 12-bit MONOCHROME1 (inverted), window, JPEG 2000 Lossless
    "hi_novoi": 0.05,  # 15/16-bit MONOCHROME2 without any VOI, uncompressed or JPEG 2000
}

_SPLIT_CODE = {"train": 0, "test": 1}


# --------------------------------------------------------------------------------------------
# The radiograph
# --------------------------------------------------------------------------------------------


@dataclass
class Radiograph:
    """One synthetic chest X-ray: ``image`` float32 in [0, 1] (air dark) at size x size,
    one boolean mask per pneumothorax region, the boolean lung mask and the patient's sex."""

    image: np.ndarray
    lesions: list[np.ndarray]
    lung: np.ndarray
    sex: str

    def display(self) -> np.ndarray:
        """The canonical 8-bit rendering (what every format decodes to)."""
        return np.round(np.clip(self.image, 0.0, 1.0) * 255.0).astype(np.uint8)

    def union(self) -> np.ndarray:
        """Union of the lesion masks (uint8 0/1)."""
        out = np.zeros(self.image.shape, dtype=np.uint8)
        for m in self.lesions:
            out |= m.astype(np.uint8)
        return out


class _Canvas:
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


def _smooth(arr: np.ndarray, sigma: float) -> np.ndarray:
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


def _closed_spline(points: np.ndarray, per_segment: int = 16) -> np.ndarray:
    """Closed Catmull-Rom curve through ``points`` (N, 2)."""
    p = np.asarray(points, dtype=np.float64)
    p0, p1, p2, p3 = np.roll(p, 1, 0), p, np.roll(p, -1, 0), np.roll(p, -2, 0)
    t = np.linspace(0, 1, per_segment, endpoint=False)[None, :, None]
    a, b, c, d = (x[:, None, :] for x in (p0, p1, p2, p3))
    curve = 0.5 * (
        2 * b + (-a + c) * t + (2 * a - 5 * b + 4 * c - d) * t**2 + (-a + 3 * b - 3 * c + d) * t**3
    )
    return curve.reshape(-1, 2)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise (std ~1) with about ``cells`` blobs across the image."""
    cells = max(2, min(cells, size))
    small = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(small, (size + size * 3 // cells, size + size * 3 // cells), cv2.INTER_CUBIC)
    off = size * 3 // cells // 2
    out = big[off : off + size, off : off + size]
    return out / max(float(out.std()), 1e-6)


# Right lung (image left) outline: (|dx| from the midline, y) with a label per control point.
_LUNG_OUTLINE = (
    ((0.135, 0.128), "apex"),
    ((0.185, 0.113), "apex"),
    ((0.238, 0.128), "apex"),
    ((0.280, 0.170), "apex"),
    ((0.312, 0.230), "lateral"),
    ((0.337, 0.310), "lateral"),
    ((0.352, 0.410), "lateral"),
    ((0.360, 0.510), "lateral"),
    ((0.357, 0.610), "lateral"),
    ((0.352, 0.700), "basal"),
    ((0.350, 0.775), "basal"),
    ((0.320, 0.755), "dome"),
    ((0.255, 0.705), "dome"),
    ((0.185, 0.680), "dome"),
    ((0.115, 0.690), "dome"),
    ((0.062, 0.705), "medial"),
    ((0.058, 0.600), "medial"),
    ((0.070, 0.480), "medial"),
    ((0.066, 0.360), "medial"),
    ((0.070, 0.250), "medial"),
    ((0.090, 0.175), "medial"),
)

_BODY_OUTLINE = (
    (0.075, -0.05),
    (0.078, 0.045),
    (0.120, 0.082),
    (0.240, 0.098),
    (0.350, 0.118),
    (0.430, 0.160),
    (0.465, 0.225),
    (0.455, 0.330),
    (0.440, 0.480),
    (0.445, 0.680),
    (0.452, 0.880),
    (0.460, 1.100),
)


def _lung_outline(
    rng: np.random.Generator, side: int, cx: float, wsc: float, hsc: float, top: float, drop: float
) -> tuple[np.ndarray, np.ndarray]:
    """A jittered lung outline (dense points, normalised) and a label per point.

    ``side`` -1 is the patient's right lung (image left), +1 the left lung (image right).
    """
    ctrl = np.array([p for p, _ in _LUNG_OUTLINE])
    labels = [lab for _, lab in _LUNG_OUTLINE]
    x = ctrl[:, 0] * wsc
    y = top + (ctrl[:, 1] - 0.115) * hsc
    low = np.array([lab in ("dome", "basal") for lab in labels])
    y = y + low * drop  # diaphragm height (inspiration, side)
    x = x + rng.normal(0, 0.006, x.shape)
    y = y + rng.normal(0, 0.005, y.shape)
    pts = np.stack([cx + side * x, y], axis=1)
    per = 16
    curve = _closed_spline(pts, per)
    point_labels = np.repeat(np.array(labels), per)
    return curve, point_labels


def _vessel_tree(
    rng: np.random.Generator, hilum: tuple[float, float], side: int, reach: float
) -> tuple[list[list[np.ndarray]], list[float], list[float]]:
    """Branching pulmonary vessels from a hilum, thinner and fainter towards the periphery.

    Returns one group of polylines per generation with that generation's width and value.
    """
    groups: list[list[np.ndarray]] = []
    widths: list[float] = []
    values: list[float] = []
    n_main = int(rng.integers(7, 10))
    angle = np.linspace(-1.8, 1.65, n_main) + rng.normal(0, 0.12, n_main)
    start = np.tile(np.asarray(hilum, dtype=np.float64), (n_main, 1))
    t = np.linspace(0, 1, 5)[None, :]
    for gen in range(7):
        n = len(angle)
        length = reach * 0.11 * 0.84**gen * rng.uniform(0.6, 1.4, n)
        ang = angle[:, None] + rng.normal(0, 0.3, (n, 1)) * t + rng.normal(0, 0.12, (n, 5))
        step = np.stack([side * np.cos(ang), np.sin(ang)], axis=2) * (length[:, None, None] / 4)
        pts = start[:, None, :] + np.cumsum(step, axis=1) - step[:, :1, :]
        groups.append(list(pts))
        widths.append(0.008 * 0.76**gen)
        values.append(0.09 * 0.8**gen)
        split = rng.random(n) < (0.85 if gen < 4 else 0.6)
        spread = rng.uniform(0.25, 0.6, n)
        ends = pts[:, -1, :]
        start = np.concatenate([ends, ends[split]])
        angle = np.concatenate(
            [
                angle + np.where(split, spread * rng.uniform(0.4, 1.0, n), rng.normal(0, 0.2, n)),
                angle[split] - spread[split] * rng.uniform(0.4, 1.0, split.sum()),
            ]
        )
    return groups, widths, values


def _lesion(
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


def _lesion_areas(rng: np.random.Generator, size: int) -> list[int]:
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


def _ellipse(
    center: tuple[float, float], axes: tuple[float, float], angle_deg: float = 0.0, n: int = 48
) -> np.ndarray:
    """Normalised polygon of an ellipse."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    a = np.deg2rad(angle_deg)
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    return np.stack(
        [center[0] + x * np.cos(a) - y * np.sin(a), center[1] + x * np.sin(a) + y * np.cos(a)], 1
    )


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


@dataclass
class _Anatomy:
    """Per-image random anatomy parameters (normalised units)."""

    sex: str
    cx: float
    wsc: float  # lung width scale
    hsc: float  # lung height scale
    top: float  # lung apex height
    bw: float  # body width scale


def _body(
    rng: np.random.Generator, canvas: _Canvas, low: _Canvas, an: _Anatomy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body coverage at full size, and at low size the soft-tissue thickness (central parts
    thicker) and the attenuation of the arms."""
    half = np.array(_BODY_OUTLINE)
    half[:, 0] = half[:, 0] * np.where(half[:, 1] > 0.09, an.bw, 1.0)
    half[:, 0] += rng.normal(0, 0.004, len(half))
    left = np.stack([an.cx - half[:, 0], half[:, 1]], 1)
    right = np.stack([an.cx + half[::-1, 0], half[::-1, 1]], 1)
    outline = [_closed_spline(np.concatenate([left, right]), 6)]
    body = _smooth(canvas.fill(outline), 0.004 * canvas.size)
    thick = _smooth(low.fill(outline), 0.09 * low.size)
    arms_att = np.zeros_like(thick)
    if rng.random() < 0.6:  # arms at the sides, sometimes touching the body
        gap = rng.uniform(0.0, 0.03)
        arms = []
        for side in (-1, 1):
            x0 = an.cx + side * (0.465 * an.bw + gap)
            arms.append(
                np.array(
                    [
                        [x0, 0.25],
                        [x0 + side * 0.12, 0.2],
                        [x0 + side * 0.14, 1.1],
                        [x0 + side * 0.01, 1.1],
                    ]
                )
            )
        arms_att = 0.42 * _smooth(low.fill(arms), 0.01 * low.size)
    return body, thick, arms_att


def _mediastinum(
    rng: np.random.Generator, canvas: _Canvas, low: _Canvas, an: _Anatomy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-size heart mask; at low size the mediastinum + heart + spine - trachea attenuation
    and the mediastinum coverage."""
    L, cx, top, hsc = low.size, an.cx, an.top, an.hsc
    heart_c = (cx + rng.uniform(0.035, 0.065), top + rng.uniform(0.47, 0.52) * hsc)
    heart_ax = (rng.uniform(0.15, 0.185) * an.wsc, rng.uniform(0.11, 0.13) * hsc)
    heart_poly = [_ellipse(heart_c, heart_ax, rng.uniform(-32, -18))]
    heart = canvas.fill(heart_poly)
    heart_lo = low.fill(heart_poly)
    knob = _ellipse((cx + 0.06, top + 0.21 * hsc), (0.035, 0.03))
    medi_poly = np.array(
        [[cx - 0.07, 0.05], [cx + 0.07, 0.05], [cx + 0.085, 1.1], [cx - 0.085, 1.1]]
    )
    medi = _smooth(low.fill([medi_poly, knob]), 0.012 * L)
    att = 0.15 * medi + 0.03 * _smooth(heart_lo, 0.01 * L)
    spine = _smooth(low.fill([_rect(cx - 0.031, -0.1, cx + 0.031, 1.1)]), 0.005 * L)
    yy = (np.arange(L, dtype=np.float32)[:, None] + 0.5) / L
    vert = 0.5 + 0.5 * np.cos(2 * np.pi * (yy - top) / (0.052 * hsc))
    att += spine * (0.035 + 0.012 * vert) * (1.0 - 0.5 * _smooth(heart_lo, 0.02 * L))
    trachea = np.array(
        [
            [cx - 0.017, -0.1],
            [cx + 0.017, -0.1],
            [cx + 0.019, top + 0.22 * hsc],
            [cx - 0.011, top + 0.22 * hsc],
        ]
    )
    att -= 0.09 * _smooth(low.fill([trachea]), 0.006 * L)
    return heart, att, np.maximum(medi, heart_lo)


def _bones(
    rng: np.random.Generator, canvas: _Canvas, an: _Anatomy
) -> tuple[np.ndarray, np.ndarray]:
    """Ribs (posterior arches with cortical edges, faint anterior ribs) and clavicles + humeral
    heads, as two attenuation layers: ribs and the shoulder girdle."""
    S, cx, top, hsc, wsc = canvas.size, an.cx, an.top, an.hsc, an.wsc
    lat = np.array([p for p, lab in _LUNG_OUTLINE if lab in ("apex", "lateral", "basal")])
    lat_y, lat_x = top + (lat[:, 1] - 0.115) * hsc, lat[:, 0] * wsc
    order = np.argsort(lat_y)
    lat_y, lat_x = lat_y[order], lat_x[order]
    spacing = rng.uniform(0.056, 0.064) * hsc
    groups: list[list[np.ndarray]] = []
    widths: list[float] = []
    values: list[float] = []
    t = np.linspace(0, 1, 24)
    t2 = np.linspace(0, 1, 12)
    for k in range(10):
        w = 0.0135 + 0.0011 * k
        y0 = top - 0.015 + k * spacing
        x_end = float(np.interp(y0 + 0.07, lat_y, lat_x)) + 0.025
        dx = 0.035 + (x_end - 0.035) * t
        y = y0 - 0.032 * np.sin(np.pi * t * 0.85) + (0.085 + 0.004 * k) * t**3
        posts, edges, ants = [], [], []
        for side in (-1, 1):
            post = np.stack([cx + side * dx, y], 1)
            posts.append(post)
            edges += [post + [0, -w * 0.42], post + [0, w * 0.42]]
            ya = y[-1] - 0.015
            ants.append(
                np.stack([cx + side * (x_end - (x_end - 0.14) * t2), ya + 0.10 * t2**1.2], 1)
            )
        groups += [posts, edges, ants]
        widths += [w, w * 0.22, w * 0.8]
        values += [0.045, 0.06, 0.022]
    ribs = _smooth(canvas.lines(groups, widths, values), 0.002 * S)
    clav, heads = [], []
    for side in (-1, 1):
        clav_y = top + 0.085 - 0.06 * t + 0.012 * np.sin(2 * np.pi * t) + rng.normal(0, 0.008)
        clav.append(np.stack([cx + side * (0.035 + 0.30 * wsc * t), clav_y], 1))
        heads.append(_ellipse((cx + side * 0.43 * an.bw, top + 0.05), (0.052, 0.056)))
    girdle = canvas.lines([clav], [0.026], [0.09])
    girdle += 0.08 * canvas.fill(heads)
    return ribs, _smooth(girdle, 0.003 * S)


def _devices(rng: np.random.Generator, canvas: _Canvas, an: _Anatomy) -> np.ndarray:
    """ECG lead wires with electrodes and tubes: thin bright lines (distractors)."""
    groups: list[list[np.ndarray]] = []
    widths: list[float] = []
    values: list[float] = []
    if rng.random() < 0.25:
        for _ in range(int(rng.integers(1, 3))):
            ctrl = rng.uniform([0.1, 0.05], [0.9, 0.95], (4, 2))
            t = np.linspace(0, 1, 60)[:, None]
            bez = (
                (1 - t) ** 3 * ctrl[0]
                + 3 * (1 - t) ** 2 * t * ctrl[1]
                + 3 * (1 - t) * t**2 * ctrl[2]
                + t**3 * ctrl[3]
            )
            ang = np.linspace(0, 2 * np.pi, 20)
            ring = ctrl[3] + 0.017 * np.stack([np.cos(ang), np.sin(ang)], 1)
            groups += [[bez], [ring]]
            widths += [0.003, 0.004]
            values += [0.33, 0.4]
    if rng.random() < 0.12:
        t = np.linspace(0, 1, 30)[:, None]
        if rng.random() < 0.5:  # endotracheal tube, tip above the carina
            tube = np.concatenate([an.cx + 0.005 * np.sin(3 * t), t * (an.top + 0.18)], 1)
        else:  # nasogastric tube down to the stomach
            tube = np.concatenate(
                [
                    an.cx + 0.015 * t + 0.17 * np.clip(t - 0.7, 0, 1) / 0.3,
                    t * (an.top + 0.72 * an.hsc),
                ],
                1,
            )
        groups += [[tube], [tube + [0.002, 0]]]
        widths += [0.009, 0.003]
        values += [0.12, 0.25]
    if not groups:
        return np.zeros((canvas.size, canvas.size), np.float32)
    return _smooth(canvas.lines(groups, widths, values), 0.4)


def _marker(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Sometimes a bright side marker letter in an upper corner."""
    if rng.random() >= 0.5:
        return img
    S = img.shape[0]
    letter = "L" if rng.random() < 0.5 else "R"
    scale = S / 512 * rng.uniform(1.1, 1.6)
    thick = max(1, int(round(S / 256)))
    right = rng.random() < 0.5
    x0 = int(S * (rng.uniform(0.83, 0.88) if right else rng.uniform(0.04, 0.08)))
    y0 = int(S * rng.uniform(0.07, 0.12))
    (tw, th), base = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    y_top = max(0, y0 - th - thick)
    h, w = min(S - y_top, th + base + 2 * thick), min(S - x0, tw + 2 * thick)
    patch = np.zeros((h, w), np.uint8)
    cv2.putText(
        patch, letter, (0, y0 - y_top), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA
    )
    m = np.zeros((S, S), np.float32)
    m[y_top : y_top + h, x0 : x0 + w] = patch.astype(np.float32) / 255.0
    return img * (1 - m) + m * rng.uniform(0.85, 0.97)


def _upsample(layers: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Resize low-size layers to size x size (bilinear)."""
    return [cv2.resize(x, (size, size), interpolation=cv2.INTER_LINEAR) for x in layers]


def _pick_lesions(
    rng: np.random.Generator,
    canvas: _Canvas,
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
    for i, n_px in enumerate(_lesion_areas(rng, size)):
        if i > 0 and rng.random() < 0.35:
            p0 = p0 + rng.normal(0, 0.03 * size, 2)
        else:
            if i > 0 and rng.random() < 0.15:
                side = -side
            curve, labels = outlines[side]
            region = rng.choice(["apex", "lateral", "basal"], p=[0.4, 0.45, 0.15])
            cand = canvas.px(curve[labels == region])
            p0 = cand[rng.integers(len(cand))]
        mask = _lesion(rng, lung, depth, p0, n_px)
        if mask.any():
            lesions.append(mask)
    return lesions


def synthesize(seed: int, split: str, index: int, size: int, positive: bool) -> Radiograph:
    """Generate one radiograph, seeded by ``(seed, split, index)`` alone.

    Smooth components are drawn on a quarter-size canvas, vessels and bones on a half-size one,
    and upsampled once; edges, lesions, devices and noise are drawn at full size.
    """
    rng = np.random.default_rng(_seq(seed, _SPLIT_CODE[split], index))
    S = size
    sex = "F" if rng.random() < 0.45 else "M"
    transform = {
        "angle": float(np.deg2rad(rng.normal(0, 2.0))),
        "scale": float(rng.uniform(0.93, 1.05)),
        "shift": (float(rng.normal(0, 0.015)), float(rng.normal(0.005, 0.015))),
    }
    canvas = _Canvas(S, **transform)
    mid = _Canvas(max(32, S // 2), **transform)
    low = _Canvas(max(32, S // 4), **transform)
    L = low.size
    an = _Anatomy(
        sex=sex,
        cx=0.5,
        wsc=rng.uniform(0.9, 1.07) * (0.95 if sex == "F" else 1.0),
        hsc=rng.uniform(0.92, 1.08),
        top=0.115 + rng.normal(0, 0.012),
        bw=rng.uniform(0.93, 1.08) * (0.96 if sex == "F" else 1.0),
    )
    cx, top, hsc, wsc = an.cx, an.top, an.hsc, an.wsc

    body, thick_lo, add_lo = _body(rng, canvas, low, an)
    heart, medi_att_lo, medi_lo = _mediastinum(rng, canvas, low, an)
    add_lo = add_lo + medi_att_lo

    # --- lungs -----------------------------------------------------------------------------
    lung_bin = np.zeros((S, S), np.uint8)
    outlines = {}
    for side in (-1, 1):
        drop = rng.uniform(-0.03, 0.04) + (0.02 if side == 1 else 0.0)
        w_side = wsc * (0.95 if side == 1 else 1.0) * rng.uniform(0.97, 1.03)
        curve, labels = _lung_outline(rng, side, cx, w_side, hsc, top, drop)
        outlines[side] = (curve, labels)
        lung_bin |= canvas.mask([curve])
    lung_bin[heart > 0.5] = 0
    lung = lung_bin.astype(bool)
    lung_soft = _smooth(lung_bin.astype(np.float32), 0.005 * S)
    lung_lo = cv2.resize(lung_soft, (L, L), interpolation=cv2.INTER_AREA)
    # distance to the chest wall (apical, lateral and basal lung border, not the mediastinum,
    # heart or diaphragm): pneumothoraces hug the wall
    wall = np.full((S, S), 255, np.uint8)
    wall_paths = []
    for curve, labels in outlines.values():
        on_wall = labels != "medial"
        on_wall &= labels != "dome"
        wall_paths.append(canvas.px(curve[on_wall]))
    shift = _Canvas.SHIFT
    cv2.polylines(
        wall,
        [np.round(p * (1 << shift)).astype(np.int32) for p in wall_paths],
        False,
        0,
        1,
        cv2.LINE_8,
        shift,
    )
    depth = cv2.distanceTransform(wall, cv2.DIST_L2, 5)

    # --- pneumothorax regions (decided before the lung is rendered; they change it) ---------
    lesions = _pick_lesions(rng, canvas, outlines, lung, depth) if positive else []
    les = np.zeros((S, S), np.float32)
    for m in lesions:
        les = np.maximum(les, m.astype(np.float32))
    les_soft = _smooth(les, 0.35 + 0.0015 * S) if lesions else les

    # parenchymal texture, hilar shadows and vessels: absent inside a pneumothorax
    tex_lo = 0.016 * _smooth_noise(rng, L, 14) + 0.010 * _smooth_noise(rng, L, 40)
    groups: list[list[np.ndarray]] = []
    widths: list[float] = []
    values: list[float] = []
    hila = []
    for side in (-1, 1):
        hilum = (cx + side * rng.uniform(0.10, 0.125) * wsc, top + rng.uniform(0.31, 0.36) * hsc)
        hila.append(_ellipse(hilum, (0.032, 0.055), side * 15))
        g, w, v = _vessel_tree(rng, hilum, side, reach=0.5 * wsc)
        groups += g
        widths += w
        values += v
    tex_lo += 0.06 * _smooth(low.fill(hila), 0.02 * L)
    vessels = _smooth(mid.lines(groups, widths, values), 0.3 + 0.002 * mid.size)
    ribs, girdle = _bones(rng, mid, an)
    ribs, girdle, vessels = _upsample([ribs, girdle, vessels], S)

    if sex == "F":  # breast shadows over the lung bases
        breasts = [
            _ellipse(
                (cx + side * rng.uniform(0.2, 0.26) * wsc, top + rng.uniform(0.58, 0.66) * hsc),
                (0.15, 0.12),
            )
            for side in (-1, 1)
        ]
        add_lo += rng.uniform(0.04, 0.08) * _smooth(low.fill(breasts), 0.035 * L)
    if rng.random() < 0.5:  # gastric bubble under the left dome
        gy = float(outlines[1][0][:, 1].max()) + 0.04
        bubble = _ellipse((cx + rng.uniform(0.14, 0.24), gy), (0.05, 0.028))
        add_lo -= rng.uniform(0.08, 0.16) * _smooth(low.fill([bubble]) * (1 - lung_lo), 0.008 * L)

    thick, add, tex, medi = _upsample([thick_lo, add_lo, tex_lo, medi_lo], S)
    att = body * (0.30 + 0.26 * thick) + add
    # lung air: darker fields, a little brighter towards the bases and apices
    yy = (np.arange(S, dtype=np.float32)[:, None] + 0.5) / S
    yy_lung = (yy - (top + 0.35 * hsc)) / (0.35 * hsc)
    air = 0.30 + 0.03 * rng.standard_normal() - 0.03 * (1.0 - np.clip(yy_lung**2, 0, 1))
    att -= lung_soft * air
    att += lung_soft * (1.0 - les_soft) * (tex + vessels)
    if lesions:
        # more air, and a thin bright visceral pleural line along the collapsed lung's edge
        att -= rng.uniform(0.03, 0.055) * les_soft * lung_soft
        k = max(1, int(round(S / 256)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
        les_u8 = les.astype(np.uint8)
        ring = (cv2.dilate(les_u8, kernel) > 0) & ~les.astype(bool)
        ring &= cv2.erode(lung_bin, kernel) > 0
        att += rng.uniform(0.05, 0.09) * _smooth(ring.astype(np.float32), 0.4 + 0.001 * S)
        band = cv2.dilate(les_u8, np.ones((3, 3), np.uint8), iterations=max(2, S // 64)) > 0
        band &= ~les.astype(bool) & lung  # partly collapsed, denser lung next to the line
        att += 0.015 * _smooth(band.astype(np.float32), 0.01 * S)

    bone_mask = np.clip(body * 1.2, 0, 1)
    att += ribs * (0.3 + 0.7 * lung_soft) * (1.0 - 0.85 * medi) * bone_mask
    att += girdle * bone_mask
    att += _devices(rng, canvas, an)

    # --- exposure, gamma, illumination, noise, marker ----------------------------------------
    angle = rng.uniform(0, 2 * np.pi)
    xx = (np.arange(S, dtype=np.float32)[None, :] + 0.5) / S
    ramp = (xx - 0.5) * float(np.cos(angle)) + (yy - 0.5) * float(np.sin(angle))
    img = att * (1.0 + rng.uniform(-0.12, 0.12) * ramp)
    img = rng.uniform(-0.02, 0.04) + rng.uniform(0.88, 1.08) * img
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.85, 1.2)
    # detector noise, slightly correlated (half-size grain) like a CR plate read at this size
    grain = rng.standard_normal((mid.size, mid.size), dtype=np.float32)
    grain = cv2.resize(grain, (S, S), interpolation=cv2.INTER_LINEAR)
    img = img + (rng.uniform(0.006, 0.014) * 1.6) * grain
    img = _marker(rng, img)
    return Radiograph(image=img.astype(np.float32), lesions=lesions, lung=lung, sex=sex)


# --------------------------------------------------------------------------------------------
# The data set: plan, DICOM files, csv files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One image of the plan."""

    split: str
    index: int
    positive: bool
    fmt: str
    old: bool  # patient aged over 89


def _format_list(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` format names in the proportions of :data:`FORMATS` (largest remainder), each at
    least once when ``n >= len(FORMATS)``, in a seeded order."""
    names = list(FORMATS)
    want = np.array([FORMATS[k] for k in names]) * n
    counts = np.floor(want).astype(int)
    if n >= len(names):
        counts = np.maximum(counts, 1)
    while counts.sum() < n:
        counts[int(np.argmax(want - counts))] += 1
    while counts.sum() > n:
        counts[int(np.argmax(counts))] -= 1
    out = [name for name, c in zip(names, counts, strict=True) for _ in range(c)]
    return [out[i] for i in rng.permutation(n)]


def _plan(cfg: DemoParams) -> list[_Item]:
    """Every image of the set: which are positive (exactly ``round(n * fraction)`` per split),
    their pixel formats and which patients are over 89 (at least one per split of 5+)."""
    items: list[_Item] = []
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        code = _SPLIT_CODE[split]
        rng = np.random.default_rng(_seq(cfg.seed, 100 + code))
        n_pos = int(round(n * cfg.positive_fraction))
        positives = set(rng.choice(n, size=n_pos, replace=False).tolist()) if n else set()
        formats = _format_list(n, rng)
        old = set(np.flatnonzero(rng.random(n) < 0.03).tolist())
        if n >= 5:
            old.add(int(rng.integers(n)))
        items += [_Item(split, i, i in positives, formats[i], i in old) for i in range(n)]
    return items


def _seq(seed: int, *parts: int) -> np.random.SeedSequence:
    """The SeedSequence of ``(seed, *parts)`` (negative seeds allowed)."""
    return np.random.SeedSequence([int(v) % 2**64 for v in (seed, *parts)])


def _number(seed: int, split: str, index: int, purpose: int, digits: int = 6) -> int:
    """A deterministic pseudo-random number for one image and purpose."""
    state = _seq(seed, _SPLIT_CODE[split], index, 1000 + purpose).generate_state(1, np.uint64)
    return int(state[0] % (10**digits))


def image_uids(seed: int, split: str, index: int) -> tuple[str, str, str]:
    """SIIM-like ``(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID)`` of image ``index`` of
    ``split`` ("train" or "test"); the SOPInstanceUID is the ImageId."""
    n = 1000 + 2 * index + _SPLIT_CODE[split]
    stamp = 1517875000 + _number(seed, split, index, 5, digits=5)
    study, series, sop = (
        f"{UID_ROOT}.{kind}.{UID_SITE}.{n}.{stamp}.{_number(seed, split, index, kind)}"
        for kind in (2, 3, 4)
    )
    return study, series, sop


def _age_string(age: int, rng: np.random.Generator) -> str:
    """SIIM writes plain numbers ('38'); DICOM's AS form ('038Y') appears too."""
    return f"{age:03d}Y" if rng.random() < 0.3 else str(age)


def _header(cfg: DemoParams, item: _Item, sex: str, path: Path) -> FileDataset:
    """A dataset with file meta, patient/study/series tags and the image geometry (no pixels)."""
    from pydicom import config
    from pydicom.dataelem import DataElement
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ComputedRadiographyImageStorage,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
    )

    rng = np.random.default_rng(_seq(cfg.seed, _SPLIT_CODE[item.split], item.index, 1))
    study_uid, series_uid, sop_uid = image_uids(cfg.seed, item.split, item.index)
    number = 1000 + 2 * item.index + _SPLIT_CODE[item.split]
    modality = "DX" if rng.random() < 0.2 else "CR"
    sop_class = (
        ComputedRadiographyImageStorage
        if modality == "CR" and item.fmt != "jpeg8" and rng.random() < 0.7
        else SecondaryCaptureImageStorage
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PNEUMOSEG_DEMO"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)

    age = int(rng.integers(90, 98)) if item.old else int(np.clip(rng.normal(52, 17), 18, 89))
    study_date = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 5 * 365)))
    birth = study_date - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 360)))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY"]
        if sop_class != SecondaryCaptureImageStorage
        else ["DERIVED", "SECONDARY"]
    )
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = (
        f"{int(rng.integers(7, 20)):02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}"
    )
    ds.AccessionNumber = f"DEMOACC{_number(cfg.seed, item.split, item.index, 6, digits=8):08d}"
    ds.Modality = modality
    if sop_class == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"
    ds.Manufacturer = "PNEUMOSEG SYNTHETIC"
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = "1 DEMO STREET, DEMOVILLE"
    ds.ReferringPhysicianName = f"DEMO^REFERRER^DR{number % 37:02d}"
    ds.SeriesDescription = f"view: {'AP' if rng.random() < 0.35 else 'PA'}"
    ds.PatientName = f"DEMO^PATIENT{number:05d}"
    ds.PatientID = f"DEMOPID-{_number(cfg.seed, item.split, item.index, 7, digits=10):010d}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sex
    # plain numbers are what SIIM has but not valid AS: bypass pydicom's value validation
    ds.add(DataElement(0x00101010, "AS", _age_string(age, rng), validation_mode=config.IGNORE))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = ds.SeriesDescription.split()[-1]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"DEMO{number:05d}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    spacing = round(0.14 * 1024 / cfg.size, 4)
    ds.PixelSpacing = [spacing, spacing]
    return ds


def _compress_rle(ds: FileDataset) -> None:
    """RLE Lossless with the fast pylibjpeg-rle encoder (pydicom's own is pure Python, ~20x
    slower); keeps the SOPInstanceUID (= ImageId)."""
    from pydicom.uid import RLELossless

    ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)


def _set_pixels(ds: FileDataset, rad: Radiograph, fmt: str, rng: np.random.Generator) -> None:
    """Store the radiograph in ``ds`` in pixel format ``fmt`` (see :data:`FORMATS`)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

    img8 = rad.display()
    value = np.clip(rad.image, 0.0, 1.0).astype(np.float64)
    if fmt in ("jpeg8", "raw8", "rle8"):
        ds.set_pixel_data(img8, "MONOCHROME2", 8, generate_instance_uid=False)
        if fmt == "jpeg8":
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(img8, mode="L").save(buf, format="JPEG", quality=95)
            frame = buf.getvalue()
            ds.PixelData = encapsulate([frame])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = f"{img8.size / len(frame):.2f}"
            ds.LossyImageCompressionMethod = "ISO_10918_1"
        elif fmt == "rle8":
            _compress_rle(ds)
        return
    if fmt == "rle16":  # 16 bits, a rescale intercept and a window in rescaled units
        lo, hi = float(rng.integers(800, 3000)), float(rng.integers(60000, 65400))
        stored = np.round(lo + value * (hi - lo)).astype(np.uint16)
        ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.WindowCenter = round((lo + hi) / 2 - 1024, 1)
        ds.WindowWidth = round(hi - lo, 1)
        _compress_rle(ds)
        return
    if fmt in ("mono1_raw", "mono1_j2k"):  # inverted: air is bright in the stored values
        lo, hi = float(rng.integers(40, 300)), float(rng.integers(3700, 4060))
        stored = np.round(lo + (1.0 - value) * (hi - lo)).astype(np.uint16)
        ds.set_pixel_data(stored, "MONOCHROME1", 12, generate_instance_uid=False)
        ds.WindowCenter = round((lo + hi) / 2, 1)
        ds.WindowWidth = round(hi - lo, 1)
        if fmt == "mono1_j2k":
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        return
    if fmt == "hi_novoi":  # 15/16 bits without any VOI: readers must scale by themselves
        bits = 15 if rng.random() < 0.5 else 16
        top = 2**bits - 1
        lo, hi = top * rng.uniform(0.01, 0.05), top * rng.uniform(0.93, 0.99)
        stored = np.round(lo + value * (hi - lo)).astype(np.uint16)
        ds.set_pixel_data(stored, "MONOCHROME2", bits, generate_instance_uid=False)
        if rng.random() < 0.5:
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        return
    raise ValueError(f"unknown demo pixel format {fmt!r}")


def _write_rle_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """SIIM's RLE csv: header ``ImageId, EncodedPixels`` and ``<id>, <rle>`` rows."""
    with path.open("w", newline="") as fh:
        fh.write(",".join(RLE_HEADER) + "\n")
        for image_id, rle in rows:
            fh.write(f"{image_id}, {rle}\n")


def _clean(out: Path) -> None:
    """Remove what a previous run wrote (only our folders and csv files)."""
    for folder in (TRAIN_DIR, TEST_DIR):
        if (out / folder).is_dir():
            shutil.rmtree(out / folder)
    for old in out.glob("dicom-images-*"):
        if old.is_dir():
            shutil.rmtree(old)
    for name in (TRAIN_CSV, TRUTH_CSV, SUBMISSION_CSV):
        (out / name).unlink(missing_ok=True)


def generate_demo(
    cfg: DemoParams, out_dir: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Write the demo set to ``out_dir`` (default ``cfg.out_dir``) and return a summary:
    image counts (train, test, positive), lesion regions, transfer syntaxes, photometric
    interpretations and pixel formats used (name -> count), files and bytes written."""
    from pydicom.uid import UID

    started = time.perf_counter()
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    plan = _plan(cfg)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    syntaxes: Counter[str] = Counter()
    photometric: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    n_bytes = 0
    regions = 0
    for item in tqdm(plan, desc="demo", unit="img", disable=not progress):
        rad = synthesize(cfg.seed, item.split, item.index, cfg.size, item.positive)
        study, series, sop = image_uids(cfg.seed, item.split, item.index)
        folder = out / (TRAIN_DIR if item.split == "train" else TEST_DIR) / study / series
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{sop}.dcm"
        ds = _header(cfg, item, rad.sex, path)
        pix_rng = np.random.default_rng(_seq(cfg.seed, _SPLIT_CODE[item.split], item.index, 2))
        _set_pixels(ds, rad, item.fmt, pix_rng)
        ds.save_as(path, enforce_file_format=True)
        n_bytes += path.stat().st_size
        syntaxes[UID(ds.file_meta.TransferSyntaxUID).name] += 1
        photometric[str(ds.PhotometricInterpretation)] += 1
        formats[item.fmt] += 1
        regions += len(rad.lesions)
        encoded = [rle_encode(m.astype(np.uint8)) for m in rad.lesions] or ["-1"]
        rows[item.split].append((sop, "\n".join(encoded)))

    # SIIM's csv is not sorted: shuffle images (seeded), keep an image's rows together
    for split, name in (("train", TRAIN_CSV), ("test", TRUTH_CSV)):
        order = np.random.default_rng(_seq(cfg.seed, 300 + _SPLIT_CODE[split])).permutation(
            len(rows[split])
        )
        flat = [(rows[split][i][0], rle) for i in order for rle in rows[split][i][1].split("\n")]
        _write_rle_csv(out / name, flat)
    with (out / SUBMISSION_CSV).open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["ImageId", "EncodedPixels"])
        writer.writerows([image_id, "-1"] for image_id, _ in rows["test"])
    n_bytes += sum((out / n).stat().st_size for n in (TRAIN_CSV, TRUTH_CSV, SUBMISSION_CSV))
    positive_train = sum(1 for i in plan if i.split == "train" and i.positive)
    positive_test = sum(1 for i in plan if i.split == "test" and i.positive)
    return {
        "out_dir": str(out),
        "train": cfg.n_train,
        "test": cfg.n_test,
        "positive_train": positive_train,
        "positive_test": positive_test,
        "positive": positive_train + positive_test,
        "regions": regions,
        "transfer_syntaxes": dict(sorted(syntaxes.items())),
        "photometric": dict(sorted(photometric.items())),
        "formats": dict(sorted(formats.items())),
        "files": len(plan) + 3,
        "bytes": n_bytes,
        "seconds": round(time.perf_counter() - started, 2),
    }


def run(params: Params, progress: bool = True) -> None:
    """CLI entry: generate ``params.demo`` and print a one-line summary."""
    summary = generate_demo(params.demo, progress=progress)
    print(
        f"demo: {summary['train']} train ({summary['positive_train']} with pneumothorax) + "
        f"{summary['test']} test DICOMs in {summary['out_dir']} "
        f"({summary['bytes'] / 1e6:.1f} MB, {len(summary['transfer_syntaxes'])} transfer "
        f"syntaxes, {summary['seconds']:.1f}s)"
    )
