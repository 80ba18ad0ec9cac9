"""Sample-rate schedules, per-epoch samples and the DDP-aware sampler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pneumoseg.params import SampleRateParams
from pneumoseg.sampling import SampleRateSampler, epoch_sample, sample_rate_at

POSITIVE = np.array([True] * 20 + [False] * 80)
np.random.default_rng(3).shuffle(POSITIVE)


def _schedule(cfg: SampleRateParams, n: int) -> list[float]:
    return [sample_rate_at(cfg, e, n) for e in range(n)]


def test_constant_schedule() -> None:
    assert _schedule(SampleRateParams(start=0.4, end=0.1, shape="constant"), 3) == [0.4, 0.4, 0.4]


def test_linear_schedule() -> None:
    cfg = SampleRateParams(start=0.8, end=0.2, shape="linear")
    assert _schedule(cfg, 4) == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert _schedule(cfg, 1) == [0.8]
    assert _schedule(SampleRateParams(start=0.3, end=None, shape="linear"), 3) == [0.3, 0.3, 0.3]


def test_step_schedule() -> None:
    cfg = SampleRateParams(start=0.6, end=0.2, shape="step", steps=2)
    assert _schedule(cfg, 4) == pytest.approx([0.6, 0.6, 0.2, 0.2])
    assert _schedule(cfg, 5) == pytest.approx([0.6, 0.6, 0.6, 0.2, 0.2])
    cfg3 = SampleRateParams(start=0.9, end=0.3, shape="step", steps=3)
    assert _schedule(cfg3, 6) == pytest.approx([0.9, 0.9, 0.6, 0.6, 0.3, 0.3])
    assert _schedule(cfg3, 2) == pytest.approx([0.9, 0.3])  # more steps than epochs
    assert _schedule(SampleRateParams(start=0.5, shape="step", steps=1), 3) == [0.5] * 3


def test_schedule_rejects_bad_epoch() -> None:
    with pytest.raises(ValueError):
        sample_rate_at(SampleRateParams(), 3, 3)


def test_epoch_sample_rate_half() -> None:
    sample = epoch_sample(POSITIVE, 0.5, seed=1, epoch=1)
    assert sample.dtype == np.int64 and len(sample) == 40
    assert len(set(sample.tolist())) == 40
    assert sorted(sample[POSITIVE[sample]].tolist()) == np.flatnonzero(POSITIVE).tolist()
    assert (~POSITIVE[sample]).sum() == 20
    assert not POSITIVE[sample[:20]].all()  # shuffled, not positives first


@pytest.mark.parametrize(("rate", "n_neg"), [(1.0, 0), (0.4, 30), (0.3, 47), (0.2, 80), (0.1, 80)])
def test_epoch_sample_sizes_and_capping(rate: float, n_neg: int) -> None:
    sample = epoch_sample(POSITIVE, rate, seed=1, epoch=2)
    assert POSITIVE[sample].sum() == 20
    assert (~POSITIVE[sample]).sum() == n_neg  # round(20 * (1 - r) / r), capped at 80


def test_epoch_sample_without_positives() -> None:
    sample = epoch_sample(np.zeros(10, dtype=bool), 0.5, seed=0, epoch=0)
    assert sorted(sample.tolist()) == list(range(10))


def test_epoch_sample_is_deterministic_and_fresh_per_epoch() -> None:
    a = epoch_sample(POSITIVE, 0.5, seed=7, epoch=3)
    np.testing.assert_array_equal(a, epoch_sample(POSITIVE, 0.5, seed=7, epoch=3))
    negs = [
        set(epoch_sample(POSITIVE, 0.5, seed=7, epoch=e)) - set(np.flatnonzero(POSITIVE))
        for e in (3, 4)
    ]
    assert negs[0] != negs[1]
    assert not np.array_equal(a, epoch_sample(POSITIVE, 0.5, seed=8, epoch=3))


def test_epoch_sample_rejects_bad_rate() -> None:
    with pytest.raises(ValueError):
        epoch_sample(POSITIVE, 0.0, seed=0, epoch=0)


def test_sampler_yields_index_seed_pairs() -> None:
    sampler = SampleRateSampler(POSITIVE, seed=5)
    assert len(sampler) == 100  # before set_epoch: every image
    sampler.set_epoch(4, 0.5)
    items = list(sampler)
    assert len(items) == len(sampler) == 40
    assert all(isinstance(i, int) and isinstance(s, int) for i, s in items)
    assert [i for i, _ in items] == epoch_sample(POSITIVE, 0.5, 5, 4).tolist()
    seeds = [s for _, s in items]
    assert all(0 <= s < 2**31 for s in seeds) and len(set(seeds)) == len(seeds)
    assert items == list(sampler)  # re-iterating an epoch gives the same items
    other = SampleRateSampler(POSITIVE, seed=5)
    other.set_epoch(4, 0.5)
    assert list(other) == items  # deterministic in (seed, epoch)
    other.set_epoch(5, 0.5)
    assert [s for _, s in other] != seeds


def test_achieved_rate() -> None:
    sampler = SampleRateSampler(POSITIVE, seed=0)
    sampler.set_epoch(1, 0.5)
    assert sampler.achieved_rate == pytest.approx(0.5)
    sampler.set_epoch(2, 0.3)
    assert sampler.achieved_rate == pytest.approx(20 / 67)
    sampler.set_epoch(3, 0.1)  # capped: every image
    assert sampler.achieved_rate == pytest.approx(0.2)


def test_rank_shards_are_equal_disjoint_and_covering() -> None:
    world = 3
    single = SampleRateSampler(POSITIVE, seed=9)
    single.set_epoch(2, 0.5)  # 40 items -> padded to 42
    shards = []
    for rank in range(world):
        s = SampleRateSampler(POSITIVE, seed=9, rank=rank, world_size=world)
        s.set_epoch(2, 0.5)
        shards.append(list(s))
        assert len(s) == 14 and len(shards[-1]) == 14
    merged = [shards[i % world][i // world] for i in range(42)]  # position order
    sample = single.sample.tolist()
    assert [i for i, _ in merged] == sample + sample[:2]
    assert len({pair for shard in shards for pair in shard}) == 42  # no item twice
    counts = Counter(i for shard in shards for i, _ in shard)
    assert set(counts) == set(sample) and sum(counts.values()) == 42
    # an item keeps its augmentation seed whatever the world size
    assert merged[:40] == list(single)


def test_sampler_in_a_dataloader() -> None:
    class Echo(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(POSITIVE)

        def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
            return key

    sampler = SampleRateSampler(POSITIVE, seed=1)
    sampler.set_epoch(1, 0.5)
    loader = torch.utils.data.DataLoader(Echo(), batch_size=8, sampler=sampler)
    got = [(int(i), int(s)) for idx, seeds in loader for i, s in zip(idx, seeds, strict=True)]
    assert got == list(sampler)
