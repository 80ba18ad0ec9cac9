"""Training/validation datasets over the training arrays (:mod:`pneumoseg.arrays`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pneumoseg.arrays import ArrayRows

# Grayscale mean/std (the ImageNet statistics averaged over RGB): right for pretrained encoders
# and harmless for ones trained from scratch.
MEAN, STD = 0.449, 0.226


def to_tensor(image: np.ndarray, in_channels: int) -> torch.Tensor:
    """uint8 (H,W) -> normalised float tensor (C,H,W)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0).sub_(MEAN).div_(STD)
    return x.unsqueeze(0).expand(in_channels, -1, -1).contiguous()


class SegDataset(Dataset):
    """Image/mask pairs at ``size``; items are ``(x, y, index)``.

    Keys may be ``(index, aug_seed)`` pairs (from the sample-rate sampler): the augmentation is
    then seeded per item, so results do not depend on worker count or on resuming.
    """

    def __init__(
        self,
        ids: list[str],
        arrays_dir: str | Path | Sequence[str | Path],
        size: int,
        in_channels: int = 1,
        transform: Any | None = None,
    ) -> None:
        """``arrays_dir``: one folder of arrays, or several (an id is read from the first
        that holds it, e.g. the training arrays, then a fold's pseudo-labels)."""
        self.ids = list(ids)
        dirs = [arrays_dir] if isinstance(arrays_dir, str | Path) else list(arrays_dir)
        self.sources = [ArrayRows(d, size) for d in dirs]
        self.size = size
        self.in_channels = in_channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 image and 0/1 mask of item ``index`` at the dataset size."""
        image_id = self.ids[index]
        rows = next((r for r in self.sources if image_id in r.row), self.sources[0])
        return rows.pair(image_id)  # (the first source names its file for an unknown id)

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
