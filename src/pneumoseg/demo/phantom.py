"""One synthetic chest radiograph (:func:`synthesize`): seeded by (seed, split, index) alone,
the picture, its pneumothorax masks, the lung mask and the patient's sex."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pneumoseg.demo.anatomy import (
    Anatomy,
    draw_body,
    draw_bones,
    draw_devices,
    draw_marker,
    draw_mediastinum,
    ellipse,
    lung_outline,
    upsample,
    vessel_tree,
)
from pneumoseg.demo.canvas import Canvas, smooth, smooth_noise
from pneumoseg.demo.lesions import pick_lesions

SPLIT_CODE = {"train": 0, "test": 1}


def seed_sequence(seed: int, *parts: int) -> np.random.SeedSequence:
    """The SeedSequence of ``(seed, *parts)`` (negative seeds allowed)."""
    return np.random.SeedSequence([int(v) % 2**64 for v in (seed, *parts)])


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


def draw_lungs(
    rng: np.random.Generator, canvas: Canvas, an: Anatomy, heart: np.ndarray
) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Both lung fields (0/1 uint8, the heart cut out), their outlines by side and each
    pixel's distance to the chest wall (the apical, lateral and basal lung border, not the
    mediastinum, heart or diaphragm): pneumothoraces hug the wall."""
    S = canvas.size
    lung_bin = np.zeros((S, S), np.uint8)
    outlines = {}
    for side in (-1, 1):
        drop = rng.uniform(-0.03, 0.04) + (0.02 if side == 1 else 0.0)
        w_side = an.wsc * (0.95 if side == 1 else 1.0) * rng.uniform(0.97, 1.03)
        curve, labels = lung_outline(rng, side, an.cx, w_side, an.hsc, an.top, drop)
        outlines[side] = (curve, labels)
        lung_bin |= canvas.mask([curve])
    lung_bin[heart > 0.5] = 0
    wall = np.full((S, S), 255, np.uint8)
    wall_paths = []
    for curve, labels in outlines.values():
        on_wall = labels != "medial"
        on_wall &= labels != "dome"
        wall_paths.append(canvas.px(curve[on_wall]))
    shift = Canvas.SHIFT
    cv2.polylines(
        wall,
        [np.round(p * (1 << shift)).astype(np.int32) for p in wall_paths],
        False,
        0,
        1,
        cv2.LINE_8,
        shift,
    )
    return lung_bin, outlines, cv2.distanceTransform(wall, cv2.DIST_L2, 5)


# one recipe, step by step in the order of its random draws (the demo's bytes depend on it)
def synthesize(  # noqa: PLR0915
    seed: int, split: str, index: int, size: int, positive: bool
) -> Radiograph:
    """Generate one radiograph, seeded by ``(seed, split, index)`` alone.

    Smooth components are drawn on a quarter-size canvas, vessels and bones on a half-size one,
    and upsampled once; edges, lesions, devices and noise are drawn at full size.
    """
    rng = np.random.default_rng(seed_sequence(seed, SPLIT_CODE[split], index))
    S = size
    sex = "F" if rng.random() < 0.45 else "M"
    transform = {
        "angle": float(np.deg2rad(rng.normal(0, 2.0))),
        "scale": float(rng.uniform(0.93, 1.05)),
        "shift": (float(rng.normal(0, 0.015)), float(rng.normal(0.005, 0.015))),
    }
    canvas = Canvas(S, **transform)
    mid = Canvas(max(32, S // 2), **transform)
    low = Canvas(max(32, S // 4), **transform)
    L = low.size
    an = Anatomy(
        sex=sex,
        cx=0.5,
        wsc=rng.uniform(0.9, 1.07) * (0.95 if sex == "F" else 1.0),
        hsc=rng.uniform(0.92, 1.08),
        top=0.115 + rng.normal(0, 0.012),
        bw=rng.uniform(0.93, 1.08) * (0.96 if sex == "F" else 1.0),
    )
    cx, top, hsc, wsc = an.cx, an.top, an.hsc, an.wsc

    body, thick_lo, add_lo = draw_body(rng, canvas, low, an)
    heart, medi_att_lo, medi_lo = draw_mediastinum(rng, canvas, low, an)
    add_lo = add_lo + medi_att_lo

    lung_bin, outlines, depth = draw_lungs(rng, canvas, an, heart)
    lung = lung_bin.astype(bool)
    lung_soft = smooth(lung_bin.astype(np.float32), 0.005 * S)
    lung_lo = cv2.resize(lung_soft, (L, L), interpolation=cv2.INTER_AREA)

    # --- pneumothorax regions (decided before the lung is rendered; they change it) ---------
    lesions = pick_lesions(rng, canvas, outlines, lung, depth) if positive else []
    les = np.zeros((S, S), np.float32)
    for m in lesions:
        les = np.maximum(les, m.astype(np.float32))
    les_soft = smooth(les, 0.35 + 0.0015 * S) if lesions else les

    # parenchymal texture, hilar shadows and vessels: absent inside a pneumothorax
    tex_lo = 0.016 * smooth_noise(rng, L, 14) + 0.010 * smooth_noise(rng, L, 40)
    groups: list[list[np.ndarray]] = []
    widths: list[float] = []
    values: list[float] = []
    hila = []
    for side in (-1, 1):
        hilum = (cx + side * rng.uniform(0.10, 0.125) * wsc, top + rng.uniform(0.31, 0.36) * hsc)
        hila.append(ellipse(hilum, (0.032, 0.055), side * 15))
        g, w, v = vessel_tree(rng, hilum, side, reach=0.5 * wsc)
        groups += g
        widths += w
        values += v
    tex_lo += 0.06 * smooth(low.fill(hila), 0.02 * L)
    vessels = smooth(mid.lines(groups, widths, values), 0.3 + 0.002 * mid.size)
    ribs, girdle = draw_bones(rng, mid, an)
    ribs, girdle, vessels = upsample([ribs, girdle, vessels], S)

    if sex == "F":  # breast shadows over the lung bases
        breasts = [
            ellipse(
                (cx + side * rng.uniform(0.2, 0.26) * wsc, top + rng.uniform(0.58, 0.66) * hsc),
                (0.15, 0.12),
            )
            for side in (-1, 1)
        ]
        add_lo += rng.uniform(0.04, 0.08) * smooth(low.fill(breasts), 0.035 * L)
    if rng.random() < 0.5:  # gastric bubble under the left dome
        gy = float(outlines[1][0][:, 1].max()) + 0.04
        bubble = ellipse((cx + rng.uniform(0.14, 0.24), gy), (0.05, 0.028))
        add_lo -= rng.uniform(0.08, 0.16) * smooth(low.fill([bubble]) * (1 - lung_lo), 0.008 * L)

    thick, add, tex, medi = upsample([thick_lo, add_lo, tex_lo, medi_lo], S)
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
        att += rng.uniform(0.05, 0.09) * smooth(ring.astype(np.float32), 0.4 + 0.001 * S)
        band = cv2.dilate(les_u8, np.ones((3, 3), np.uint8), iterations=max(2, S // 64)) > 0
        band &= ~les.astype(bool) & lung  # partly collapsed, denser lung next to the line
        att += 0.015 * smooth(band.astype(np.float32), 0.01 * S)

    bone_mask = np.clip(body * 1.2, 0, 1)
    att += ribs * (0.3 + 0.7 * lung_soft) * (1.0 - 0.85 * medi) * bone_mask
    att += girdle * bone_mask
    att += draw_devices(rng, canvas, an)

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
    img = draw_marker(rng, img)
    return Radiograph(image=img.astype(np.float32), lesions=lesions, lung=lung, sex=sex)
