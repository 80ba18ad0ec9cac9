"""Training/validation datasets over the processed PNGs (``<processed>/images|masks``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

# Grayscale mean/std (the ImageNet statistics averaged over RGB): right for pretrained encoders
# and harmless for ones trained from scratch.
MEAN, STD = 0.449, 0.226


def to_tensor(image: np.ndarray, in_channels: int) -> torch.Tensor:
    """uint8 (H,W) -> normalised float tensor (C,H,W)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0).sub_(MEAN).div_(STD)
    return x.unsqueeze(0).expand(in_channels, -1, -1).contiguous()


def read_gray(path: Path, size: int | None = None, mask: bool = False) -> np.ndarray:
    """Read a PNG as uint8 gray, resized to ``size`` x ``size`` when given (area resize,
    nearest for masks)."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(
            f"{path}: missing or unreadable PNG; restore it with `dvc checkout "
            f"{path.parent.parent}` or rerun `dvc repro -f -s convert`"
        )
    if size is not None and image.shape != (size, size):
        interp = cv2.INTER_NEAREST if mask else cv2.INTER_AREA
        image = cv2.resize(image, (size, size), interpolation=interp)
    return image


class SegDataset(Dataset):
    """Image/mask pairs at ``size``; items are ``(x, y, index)``.

    Keys may be ``(index, aug_seed)`` pairs (from the sample-rate sampler): the augmentation is
    then seeded per item, so results do not depend on worker count or on resuming.
    """

    def __init__(
        self,
        ids: list[str],
        processed_dir: str | Path,
        size: int,
        in_channels: int = 1,
        transform: Any | None = None,
        cache: bool = True,
    ) -> None:
        self.ids = list(ids)
        self.root = Path(processed_dir)
        self.size = size
        self.in_channels = in_channels
        self.transform = transform
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 image and 0/1 mask of item ``index`` at the dataset size."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        image_id = self.ids[index]
        image = read_gray(self.root / "images" / f"{image_id}.png", self.size)
        mask = read_gray(self.root / "masks" / f"{image_id}.png", self.size, mask=True) > 127
        pair = (image, mask.astype(np.uint8))
        if self.cache is not None:
            self.cache[index] = pair
        return pair

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.load(int(index))
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_seed(int(seed))
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        y = torch.from_numpy(np.ascontiguousarray(mask)).float().unsqueeze(0)
        return to_tensor(image, self.in_channels), y, int(index)
