"""The anatomy of a synthetic frontal chest radiograph: body, lungs and their vessels,
mediastinum and heart, clavicles and ribs, devices and markers."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pneumoseg.demo.canvas import Canvas, closed_spline, smooth

LUNG_OUTLINE = (
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

BODY_OUTLINE = (
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


def lung_outline(
    rng: np.random.Generator, side: int, cx: float, wsc: float, hsc: float, top: float, drop: float
) -> tuple[np.ndarray, np.ndarray]:
    """A jittered lung outline (dense points, normalised) and a label per point.

    ``side`` -1 is the patient's right lung (image left), +1 the left lung (image right).
    """
    ctrl = np.array([p for p, _ in LUNG_OUTLINE])
    labels = [lab for _, lab in LUNG_OUTLINE]
    x = ctrl[:, 0] * wsc
    y = top + (ctrl[:, 1] - 0.115) * hsc
    low = np.array([lab in ("dome", "basal") for lab in labels])
    y = y + low * drop  # diaphragm height (inspiration, side)
    x = x + rng.normal(0, 0.006, x.shape)
    y = y + rng.normal(0, 0.005, y.shape)
    pts = np.stack([cx + side * x, y], axis=1)
    per = 16
    curve = closed_spline(pts, per)
    point_labels = np.repeat(np.array(labels), per)
    return curve, point_labels


def vessel_tree(
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


def ellipse(
    center: tuple[float, float], axes: tuple[float, float], angle_deg: float = 0.0, n: int = 48
) -> np.ndarray:
    """Normalised polygon of an ellipse."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    a = np.deg2rad(angle_deg)
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    return np.stack(
        [center[0] + x * np.cos(a) - y * np.sin(a), center[1] + x * np.sin(a) + y * np.cos(a)], 1
    )


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


@dataclass
class Anatomy:
    """Per-image random anatomy parameters (normalised units)."""

    sex: str
    cx: float
    wsc: float  # lung width scale
    hsc: float  # lung height scale
    top: float  # lung apex height
    bw: float  # body width scale


def draw_body(
    rng: np.random.Generator, canvas: Canvas, low: Canvas, an: Anatomy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body coverage at full size, and at low size the soft-tissue thickness (central parts
    thicker) and the attenuation of the arms."""
    half = np.array(BODY_OUTLINE)
    half[:, 0] = half[:, 0] * np.where(half[:, 1] > 0.09, an.bw, 1.0)
    half[:, 0] += rng.normal(0, 0.004, len(half))
    left = np.stack([an.cx - half[:, 0], half[:, 1]], 1)
    right = np.stack([an.cx + half[::-1, 0], half[::-1, 1]], 1)
    outline = [closed_spline(np.concatenate([left, right]), 6)]
    body = smooth(canvas.fill(outline), 0.004 * canvas.size)
    thick = smooth(low.fill(outline), 0.09 * low.size)
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
        arms_att = 0.42 * smooth(low.fill(arms), 0.01 * low.size)
    return body, thick, arms_att


def draw_mediastinum(
    rng: np.random.Generator, canvas: Canvas, low: Canvas, an: Anatomy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-size heart mask; at low size the mediastinum + heart + spine - trachea attenuation
    and the mediastinum coverage."""
    L, cx, top, hsc = low.size, an.cx, an.top, an.hsc
    heart_c = (cx + rng.uniform(0.035, 0.065), top + rng.uniform(0.47, 0.52) * hsc)
    heart_ax = (rng.uniform(0.15, 0.185) * an.wsc, rng.uniform(0.11, 0.13) * hsc)
    heart_poly = [ellipse(heart_c, heart_ax, rng.uniform(-32, -18))]
    heart = canvas.fill(heart_poly)
    heart_lo = low.fill(heart_poly)
    knob = ellipse((cx + 0.06, top + 0.21 * hsc), (0.035, 0.03))
    medi_poly = np.array(
        [[cx - 0.07, 0.05], [cx + 0.07, 0.05], [cx + 0.085, 1.1], [cx - 0.085, 1.1]]
    )
    medi = smooth(low.fill([medi_poly, knob]), 0.012 * L)
    att = 0.15 * medi + 0.03 * smooth(heart_lo, 0.01 * L)
    spine = smooth(low.fill([rect(cx - 0.031, -0.1, cx + 0.031, 1.1)]), 0.005 * L)
    yy = (np.arange(L, dtype=np.float32)[:, None] + 0.5) / L
    vert = 0.5 + 0.5 * np.cos(2 * np.pi * (yy - top) / (0.052 * hsc))
    att += spine * (0.035 + 0.012 * vert) * (1.0 - 0.5 * smooth(heart_lo, 0.02 * L))
    trachea = np.array(
        [
            [cx - 0.017, -0.1],
            [cx + 0.017, -0.1],
            [cx + 0.019, top + 0.22 * hsc],
            [cx - 0.011, top + 0.22 * hsc],
        ]
    )
    att -= 0.09 * smooth(low.fill([trachea]), 0.006 * L)
    return heart, att, np.maximum(medi, heart_lo)


def draw_bones(
    rng: np.random.Generator, canvas: Canvas, an: Anatomy
) -> tuple[np.ndarray, np.ndarray]:
    """Ribs (posterior arches with cortical edges, faint anterior ribs) and clavicles + humeral
    heads, as two attenuation layers: ribs and the shoulder girdle."""
    S, cx, top, hsc, wsc = canvas.size, an.cx, an.top, an.hsc, an.wsc
    lat = np.array([p for p, lab in LUNG_OUTLINE if lab in ("apex", "lateral", "basal")])
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
    ribs = smooth(canvas.lines(groups, widths, values), 0.002 * S)
    clav, heads = [], []
    for side in (-1, 1):
        clav_y = top + 0.085 - 0.06 * t + 0.012 * np.sin(2 * np.pi * t) + rng.normal(0, 0.008)
        clav.append(np.stack([cx + side * (0.035 + 0.30 * wsc * t), clav_y], 1))
        heads.append(ellipse((cx + side * 0.43 * an.bw, top + 0.05), (0.052, 0.056)))
    girdle = canvas.lines([clav], [0.026], [0.09])
    girdle += 0.08 * canvas.fill(heads)
    return ribs, smooth(girdle, 0.003 * S)


def draw_devices(rng: np.random.Generator, canvas: Canvas, an: Anatomy) -> np.ndarray:
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
    return smooth(canvas.lines(groups, widths, values), 0.4)


def draw_marker(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
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


def upsample(layers: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Resize low-size layers to size x size (bilinear)."""
    return [cv2.resize(x, (size, size), interpolation=cv2.INTER_LINEAR) for x in layers]
