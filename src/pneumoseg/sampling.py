"""Per-epoch positive sample rate: all positive images plus a fresh draw of negatives.

Everything is a pure function of ``(seed, epoch)`` (and the scheduled rate), so an epoch's
sample, its order and its augmentation seeds are identical after a resume and on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pneumoseg.params import SampleRateParams

AUG_SEED_LIMIT = 2**31
_AUG_STREAM = 1  # extra SeedSequence word separating augmentation seeds from the sample draw


def sample_rate_at(cfg: SampleRateParams, epoch_in_part: int, n_epochs: int) -> float:
    """Scheduled positive rate of epoch ``epoch_in_part`` (0-based) of a part of ``n_epochs``.

    ``constant``: ``start``. ``linear``: ``start`` at the first epoch to ``end`` at the last.
    ``step``: ``steps`` plateaus of nearly equal length (epoch ``e`` is on plateau
    ``e * steps // n_epochs``, so earlier plateaus are the longer ones when the epochs do not
    divide evenly), values linearly spaced from ``start`` to ``end``; more steps than epochs
    means one plateau per epoch. ``end`` None means ``end = start``.
    """
    if n_epochs < 1:
        raise ValueError(f"n_epochs must be >= 1, got {n_epochs}")
    if not 0 <= epoch_in_part < n_epochs:
        raise ValueError(f"epoch_in_part {epoch_in_part} outside [0, {n_epochs})")
    start = cfg.start
    end = cfg.start if cfg.end is None else cfg.end
    if cfg.shape == "constant" or n_epochs == 1:
        return start
    if cfg.shape == "linear":
        return start + (end - start) * epoch_in_part / (n_epochs - 1)
    steps = min(cfg.steps, n_epochs)
    if steps == 1:
        return start
    plateau = (epoch_in_part * steps) // n_epochs
    return start + (end - start) * plateau / (steps - 1)


def _seed_sequence(*words: int) -> np.random.SeedSequence:
    """SeedSequence of non-negative words (negative seeds are mapped modulo 2**64)."""
    return np.random.SeedSequence([int(w) % 2**64 for w in words])


def epoch_sample(positive: np.ndarray, rate: float, seed: int, epoch: int) -> np.ndarray:
    """Shuffled indices: every positive plus a random subset of negatives for ``rate``.

    ``n_neg = min(#neg, round(n_pos * (1 - rate) / rate))``; with no positives all negatives are
    returned (shuffled). Drawn with ``default_rng(SeedSequence([seed, epoch]))``.
    """
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    positive = np.asarray(positive, dtype=bool)
    rng = np.random.default_rng(_seed_sequence(seed, epoch))
    pos_idx = np.flatnonzero(positive)
    neg_idx = np.flatnonzero(~positive)
    if len(pos_idx) == 0:
        chosen = neg_idx
    else:
        n_neg = min(len(neg_idx), round(len(pos_idx) * (1 - rate) / rate))
        negatives = rng.choice(neg_idx, size=n_neg, replace=False)
        chosen = np.concatenate([pos_idx, negatives])
    return rng.permutation(chosen).astype(np.int64)


def augmentation_seeds(seed: int, epoch: int, n: int) -> np.ndarray:
    """Augmentation seeds in ``[0, 2**31)`` for positions ``0..n-1`` of an epoch sample."""
    rng = np.random.default_rng(_seed_sequence(seed, epoch, _AUG_STREAM))
    return rng.integers(0, AUG_SEED_LIMIT, size=n, dtype=np.int64)


class SampleRateSampler(torch.utils.data.Sampler):
    """Yields ``(dataset index, augmentation seed)`` pairs of this rank's share of an epoch.

    Call :meth:`set_epoch` before every epoch. The epoch sample is padded (repeating it from the
    start) to a multiple of ``world_size`` and rank ``r`` takes items ``r::world_size``. Before
    the first :meth:`set_epoch` the sample is all images in a shuffled order (epoch 0).
    """

    def __init__(self, positive: np.ndarray, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} invalid")
        self.positive = np.asarray(positive, dtype=bool)
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.rate: float | None = None
        self._sample = np.random.default_rng(_seed_sequence(self.seed, 0)).permutation(
            len(self.positive)
        )

    def set_epoch(self, epoch: int, rate: float) -> None:
        """Draw the sample of global epoch ``epoch`` at positive rate ``rate``."""
        self.epoch = int(epoch)
        self.rate = float(rate)
        self._sample = epoch_sample(self.positive, self.rate, self.seed, self.epoch)

    @property
    def sample(self) -> np.ndarray:
        """The whole (unpadded, all ranks) sample of the current epoch."""
        return self._sample

    @property
    def achieved_rate(self) -> float:
        """Fraction of positives in the current epoch's sample (0.0 for an empty sample)."""
        n = len(self._sample)
        return float(self.positive[self._sample].sum()) / n if n else 0.0

    def _padded_len(self) -> int:
        n = len(self._sample)
        return -(-n // self.world_size) * self.world_size

    def __len__(self) -> int:
        return self._padded_len() // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n, total = len(self._sample), self._padded_len()
        if n == 0:
            return iter(())
        positions = np.arange(total) % n  # padding repeats the sample from its start
        seeds = augmentation_seeds(self.seed, self.epoch, total)
        mine = np.arange(self.rank, total, self.world_size)
        return iter([(int(self._sample[positions[i]]), int(seeds[i])) for i in mine])
