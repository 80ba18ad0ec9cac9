"""Training arrays: the same pixels as the PNG path, shared by loader workers, clear failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_helpers import Pipeline, cli, pin_threads, pneumoseg, reset_outputs, set_params

from pneumoseg.arrays import ArrayRows, read_pair, write_arrays
from pneumoseg.data import SegDataset


@pytest.fixture(scope="module")
def project(tiny_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline's data (PNGs at 64 px, arrays at 64 px) without its training outputs."""
    path = tiny_pipeline.copy(tmp_path_factory.mktemp("arrays") / "p")
    return reset_outputs(path)


def training_ids(project: Path) -> list[str]:
    return (project / "data/arrays/ids.txt").read_text().split()


def test_arrays_hold_exactly_what_the_png_path_reads(project: Path, tmp_path: Path) -> None:
    processed = project / "data/processed"
    summary = write_arrays(processed, tmp_path / "arrays", [32, 48], progress=False)
    assert summary["sizes"] == [32, 48, 64] and summary["processed_size"] == 64
    ids = training_ids(project)
    assert summary["images"] == len(ids) == 24  # the training rows only; the test ones have no mask
    assert np.load(tmp_path / "arrays/32/images.npy", mmap_mode="r").shape == (24, 32, 32)
    positive = 0
    for size in (32, 48, 64, 40, 96):  # stored, stored, the PNGs' own, resized down, resized up
        ds = SegDataset(ids, tmp_path / "arrays", size)
        for index, image_id in enumerate(ids):
            image, mask = ds.load(index)
            want_image, want_mask = read_pair(processed, image_id, size)
            assert image.dtype == want_image.dtype == np.uint8
            np.testing.assert_array_equal(image, want_image, err_msg=f"{image_id} at {size}")
            np.testing.assert_array_equal(mask, want_mask, err_msg=f"{image_id} at {size}")
            positive += int(mask.any())
    assert positive > 0  # the comparison saw masks, not only empty ones
    x, y, index = SegDataset(ids, tmp_path / "arrays", 32)[(3, 11)]  # a sampler key
    assert x.shape == (1, 32, 32) and y.shape == (1, 32, 32) and index == 3


def test_missing_or_damaged_arrays_fail_with_one_line(project: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ids.txt: not found; run `dvc repro arrays`"):
        ArrayRows(tmp_path / "nothing", 64)
    out = tmp_path / "arrays"
    write_arrays(project / "data/processed", out, [], progress=False)
    rows = ArrayRows(out, 64)
    with pytest.raises(KeyError, match="no row for ImageId nope"):
        rows.pair("nope")
    path = out / "64/masks.npy"
    path.write_bytes(path.read_bytes()[:-100])  # the last row cut short
    with pytest.raises(ValueError, match=r"masks.npy: \d+ bytes where its header promises"):
        ArrayRows(out, 64)
    np.save(out / "64/images.npy", np.zeros((3, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"images.npy: expected \(24, S, S\) uint8 rows"):
        ArrayRows(out, 64)


def test_the_arrays_stage_is_a_command_with_a_summary(project: Path, tmp_path: Path) -> None:
    work = tmp_path / "p"
    shutil.copytree(project / "data", work / "data")
    shutil.copy(project / "params.yaml", work / "params.yaml")
    set_params(work, {"arrays": {"sizes": [32]}})
    _, out, _ = cli("arrays", "--out", "data/arrays2", cwd=work)
    assert out.strip() == "arrays: 24 training images at 32 px, 64 px in data/arrays2 (0.2 MiB)"
    info = json.loads((work / "data/arrays2/arrays.json").read_text())
    assert info == {"processed_size": 64, "sizes": [32, 64]}
    assert not (work / "data/arrays2.partial").exists()


def test_zero_and_two_loader_workers_train_identical_weights(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Augmentation is seeded per item and the rows come from one file: the worker processes
    change where the work runs, not what it computes."""
    pin_threads(monkeypatch)  # bit-for-bit weights: one thread count
    weights = []
    for workers in (0, 2):
        work = tmp_path / f"w{workers}"
        shutil.copytree(project, work)
        set_params(work, {"train": {"workers": workers}})
        pneumoseg("-q", "train", "--fold", "0", cwd=work)
        state = torch.load(work / "models/folds/fold0/model.pt", weights_only=True)
        weights.append(state["state_dict"])
    zero, two = weights
    assert zero.keys() == two.keys()
    assert [k for k in zero if not torch.equal(zero[k], two[k])] == []
    assert any(v.dtype.is_floating_point and v.abs().sum() > 0 for v in zero.values())
