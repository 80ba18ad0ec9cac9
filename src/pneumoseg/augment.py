"""Training augmentation (albumentations 2.x) for square uint8 gray images and 0/1 masks.

Determinism: the training dataset calls ``transform.set_random_seed(aug_seed)`` before each
item, so an item's augmentation depends only on its seed. Plain ``A.Compose.set_random_seed``
gives *every* child transform its own generator seeded with the same value, so all children
draw identical random streams (e.g. two ``p=0.5`` transforms are then always applied together).
:class:`SeededCompose` instead shares one generator pair, seeded once, across all children.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from pneumoseg.params import AugmentParams  # noqa: E402

TRANSLATE_PERCENT = 0.05
CROP_RATIO = (0.8, 1.25)


class SeededCompose(A.Compose):
    """``A.Compose`` whose :meth:`set_random_seed` seeds one stream shared by all children."""

    def set_random_seed(self, seed: int | None) -> None:
        """Seed this compose and share its generators with every (nested) child transform."""
        super().set_random_seed(seed)
        self.set_random_state(np.random.default_rng(seed), random.Random(seed))


def _distortions(size: int, p: float) -> A.OneOf:
    """One of elastic / grid / optical distortion; magnitudes mild enough for chest X-rays."""
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    nearest = {"mask_interpolation": cv2.INTER_NEAREST}
    return A.OneOf(
        [
            # 2.x normalises the noise by its max before blurring; these give a smooth warp
            # moving pixels by roughly 0.5-1% of the image size, similar at every size
            A.ElasticTransform(alpha=0.006 * size * size, sigma=0.1 * size, **nearest, **border),
            A.GridDistortion(num_steps=5, distort_limit=0.2, **nearest, **border),
            A.OpticalDistortion(distort_limit=0.1, **nearest, **border),
        ],
        p=p,
    )


def build_train_transform(cfg: AugmentParams, size: int) -> A.Compose:
    """Random train augmentation of ``size`` x ``size`` uint8 image + mask, keeping the size.

    Transforms whose probability is 0 are left out; masks use nearest interpolation and a
    constant 0 border, so they stay binary and aligned with the image.
    """
    nearest = cv2.INTER_NEAREST
    transforms: list[A.BasicTransform | A.BaseCompose] = []
    if cfg.hflip > 0:
        transforms.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.brightness_contrast > 0:
        transforms.append(
            A.RandomBrightnessContrast(
                brightness_limit=0.2, contrast_limit=0.2, p=cfg.brightness_contrast
            )
        )
    if cfg.gamma > 0:
        transforms.append(A.RandomGamma(gamma_limit=(80, 120), p=cfg.gamma))
    if cfg.distortion > 0:
        transforms.append(_distortions(size, cfg.distortion))
    if cfg.affine > 0:
        transforms.append(
            A.Affine(
                scale=(1 - cfg.scale_limit, 1 + cfg.scale_limit),
                rotate=(-cfg.rotate_limit, cfg.rotate_limit),
                translate_percent=(-TRANSLATE_PERCENT, TRANSLATE_PERCENT),
                keep_ratio=True,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=nearest,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=cfg.affine,
            )
        )
    if cfg.crop > 0:
        transforms.append(
            A.RandomResizedCrop(
                size=(size, size),
                scale=(cfg.crop_min_scale, 1.0),
                ratio=CROP_RATIO,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=nearest,
                p=cfg.crop,
            )
        )
    return SeededCompose(transforms, mask_interpolation=nearest, strict=True)
