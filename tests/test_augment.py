"""Training augmentation: shapes, binary aligned masks, seeding, no warnings."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pickle  # noqa: E402
import warnings  # noqa: E402

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pneumoseg.augment import SeededCompose, build_train_transform  # noqa: E402
from pneumoseg.params import AugmentParams  # noqa: E402

SIZE = 96
OFF = {"hflip": 0, "brightness_contrast": 0, "gamma": 0, "distortion": 0, "affine": 0, "crop": 0}
ALL_ON = AugmentParams(
    hflip=0.5, brightness_contrast=1, gamma=1, distortion=1, affine=1, crop=1, rotate_limit=20
)


def _pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy dark image with a bright off-centre square, and the square as a 0/1 mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, (SIZE, SIZE), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[20:50, 30:70] = 1
    image[mask == 1] = 230
    return image, mask


def _apply(transform: A.Compose, seed: int, image: np.ndarray, mask: np.ndarray):
    transform.set_random_seed(seed)
    out = transform(image=image, mask=mask)
    return out["image"], out["mask"]


def test_shapes_dtypes_and_binary_masks() -> None:
    transform = build_train_transform(ALL_ON, SIZE)
    image, mask = _pair()
    for seed in range(20):
        out_image, out_mask = _apply(transform, seed, image, mask)
        assert out_image.shape == (SIZE, SIZE) and out_image.dtype == np.uint8
        assert out_mask.shape == (SIZE, SIZE) and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask).tolist()) <= {0, 1}


@pytest.mark.parametrize("which", ["distortion", "affine", "crop", "all"])
def test_mask_stays_aligned_with_image(which: str) -> None:
    geometric = {"distortion": 1.0, "affine": 1.0, "crop": 1.0}
    on = geometric if which == "all" else {which: 1.0}
    cfg = AugmentParams(**(OFF | on | {"rotate_limit": 30, "scale_limit": 0.2, "hflip": 0.5}))
    transform = build_train_transform(cfg, SIZE)
    image, mask = _pair()
    band_kernel = np.ones((3, 3), np.uint8)
    for seed in range(15):
        out_image, out_mask = _apply(transform, seed, image, mask)
        bright = (out_image > 135).astype(np.uint8)
        assert out_mask.sum() > 100
        # every disagreement lies within 2 pixels of the mask boundary
        outer = cv2.dilate(out_mask, band_kernel, iterations=2)
        inner = cv2.erode(out_mask, band_kernel, iterations=2, borderType=cv2.BORDER_REPLICATE)
        disagree = bright != out_mask
        assert not (disagree & ((outer == 0) | (inner == 1))).any(), f"seed {seed}"


def test_hflip_only_flips_image_and_mask_together() -> None:
    transform = build_train_transform(AugmentParams(**(OFF | {"hflip": 1.0})), SIZE)
    assert [type(t) for t in transform.transforms] == [A.HorizontalFlip]
    image, mask = _pair()
    out_image, out_mask = _apply(transform, 0, image, mask)
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])


def test_zero_probabilities_are_identity() -> None:
    transform = build_train_transform(AugmentParams(**OFF), SIZE)
    assert len(transform.transforms) == 0
    image, mask = _pair()
    out_image, out_mask = _apply(transform, 3, image, mask)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)


def test_set_random_seed_is_deterministic() -> None:
    transform = build_train_transform(ALL_ON, SIZE)
    image, mask = _pair()
    first = [_apply(transform, s, image, mask) for s in (11, 12)]
    _apply(transform, 99, image, mask)  # consume state in between
    again = [_apply(transform, s, image, mask) for s in (11, 12)]
    fresh = build_train_transform(ALL_ON, SIZE)  # e.g. another DataLoader worker
    other = [_apply(fresh, s, image, mask) for s in (11, 12)]
    for (i1, m1), (i2, m2), (i3, m3) in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_array_equal(i1, i3)
        np.testing.assert_array_equal(m1, m3)
    assert not np.array_equal(first[0][0], first[1][0])


def test_seeded_transform_survives_pickling() -> None:
    transform = build_train_transform(ALL_ON, SIZE)
    clone = pickle.loads(pickle.dumps(transform))  # what spawn-started workers receive
    image, mask = _pair()
    a_image, a_mask = _apply(transform, 5, image, mask)
    b_image, b_mask = _apply(clone, 5, image, mask)
    np.testing.assert_array_equal(a_image, b_image)
    np.testing.assert_array_equal(a_mask, b_mask)


def test_children_do_not_share_one_random_stream() -> None:
    # plain A.Compose.set_random_seed seeds every child with the same value, so two p=0.5
    # flips are always applied together; SeededCompose shares one stream instead
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)

    def corners(compose: A.Compose) -> set[int]:
        seen = set()
        for seed in range(40):
            compose.set_random_seed(seed)
            seen.add(int(compose(image=image)["image"][0, 0]))
        return seen

    flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    assert corners(SeededCompose(flips)) == {0, 3, 12, 15}
    assert corners(A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])) == {0, 15}


def test_no_warnings_when_building_and_applying() -> None:
    image, mask = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cfg in (ALL_ON, AugmentParams(), AugmentParams(**OFF)):
            transform = build_train_transform(cfg, SIZE)
            for seed in range(5):
                _apply(transform, seed, image, mask)
