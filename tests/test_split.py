"""Stratified, seeded K-fold assignment (`pneumoseg split`)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from pneumoseg import cli
from pneumoseg.artifacts import read_folds
from pneumoseg.folds import SplitError, stratified_folds
from pneumoseg.stages.split import read_train_labels

ROOT = Path(__file__).resolve().parents[1]


def labels_of(n: int, positives: int, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    flags = np.zeros(n, int)
    flags[rng.choice(n, positives, replace=False)] = 1
    return {f"img{i:04d}": int(f) for i, f in enumerate(flags)}


def write_manifest(path: Path, train: dict[str, int], test: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ImageId", "split", "has_mask", "mask_pixels", "height", "width"])
        for image_id, has_mask in train.items():
            writer.writerow([image_id, "train", has_mask, 50 * has_mask, 64, 64])
        for image_id in test:
            writer.writerow([image_id, "test", "", "", 64, 64])
    return path


@pytest.mark.parametrize(
    "n, positives, n_folds",
    [(103, 23, 5), (50, 11, 5), (20, 3, 5), (37, 36, 4), (12, 0, 3), (9, 4, 2)],
)
def test_folds_are_stratified_and_balanced(n: int, positives: int, n_folds: int) -> None:
    labels = labels_of(n, positives)
    folds = stratified_folds(labels, n_folds, seed=42)
    assert sorted(folds) == sorted(labels)  # every training image exactly once
    assert set(folds.values()) <= set(range(n_folds))
    sizes = Counter(folds.values())
    pos = Counter(f for image_id, f in folds.items() if labels[image_id])
    neg = Counter(f for image_id, f in folds.items() if not labels[image_id])
    size_list = [sizes[k] for k in range(n_folds)]
    pos_list = [pos[k] for k in range(n_folds)]
    neg_list = [neg[k] for k in range(n_folds)]
    assert max(pos_list) - min(pos_list) <= 1, pos_list
    assert max(neg_list) - min(neg_list) <= 1, neg_list
    assert max(size_list) - min(size_list) <= 1, size_list
    assert sum(pos_list) == positives


def test_same_seed_same_folds_and_order_does_not_matter() -> None:
    labels = labels_of(80, 17)
    first = stratified_folds(labels, 5, seed=7)
    shuffled = dict(reversed(list(labels.items())))
    assert stratified_folds(labels, 5, seed=7) == first
    assert stratified_folds(shuffled, 5, seed=7) == first


def test_different_seeds_give_different_folds() -> None:
    labels = labels_of(80, 17)
    assignments = [stratified_folds(labels, 5, seed=s) for s in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert assignments[a] != assignments[b]


def test_folds_are_not_in_id_order() -> None:
    labels = {f"img{i:03d}": 0 for i in range(40)}
    folds = stratified_folds(labels, 4, seed=1)
    in_order = [folds[k] for k in sorted(folds)]
    assert in_order != [i % 4 for i in range(40)]
    assert in_order != sorted(in_order)


def test_fewer_images_than_folds_is_an_error() -> None:
    with pytest.raises(SplitError, match="3 training images cannot fill 5 folds") as info:
        stratified_folds(labels_of(3, 1), 5, seed=0)
    assert isinstance(info.value, ValueError)
    assert len(stratified_folds(labels_of(5, 1), 5, seed=0)) == 5  # exactly enough is fine


def test_manifest_labels_skip_test_images(tmp_path: Path) -> None:
    train = labels_of(10, 3)
    manifest = write_manifest(tmp_path / "manifest.csv", train, ["t1", "t2"])
    assert read_train_labels(manifest) == train


def test_manifest_with_bad_has_mask_names_the_line(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("ImageId,split,has_mask\na,train,1\nb,train,yes\n")
    with pytest.raises(SplitError, match="line 3"):
        read_train_labels(manifest)


def _project(tmp_path: Path, train: dict[str, int], test: list[str]) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["processed_dir"] = str(tmp_path / "processed")
    params["split"].update(n_folds=5, seed=42, out=str(tmp_path / "data" / "folds.csv"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_manifest(tmp_path / "processed" / "manifest.csv", train, test)
    return tmp_path / "params.yaml"


def test_cli_writes_folds_csv_from_params(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = labels_of(30, 8)
    test = [f"test{i}" for i in range(6)]
    params = _project(tmp_path, train, test)
    assert cli.main(["-q", "--params", str(params), "split"]) == 0
    out = tmp_path / "data" / "folds.csv"
    lines = out.read_text().splitlines()
    assert lines[0] == "ImageId,fold,has_mask"
    ids = [line.split(",")[0] for line in lines[1:]]
    assert ids == sorted(train)  # every train image once, sorted; no test image
    folds = read_folds(out)
    assert {k: v[1] for k, v in folds.items()} == train
    assert {k: v[0] for k, v in folds.items()} == stratified_folds(train, 5, 42)
    assert "30 images into 5 folds" in capsys.readouterr().out


def test_cli_flags_override_params(tmp_path: Path) -> None:
    train = labels_of(30, 8)
    params = _project(tmp_path, train, [])
    other = tmp_path / "other.csv"
    args = ["-q", "--params", str(params), "split", "--folds", "3", "--seed", "9"]
    assert cli.main([*args, "--out", str(other)]) == 0
    assert not (tmp_path / "data" / "folds.csv").exists()
    folds = read_folds(other)
    assert {k: v[0] for k, v in folds.items()} == stratified_folds(train, 3, 9)
    # same command again: byte-identical output
    first = other.read_bytes()
    assert cli.main([*args, "--out", str(other)]) == 0
    assert other.read_bytes() == first


def test_cli_reports_too_few_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = _project(tmp_path, labels_of(3, 1), ["t"])
    assert cli.main(["-q", "--params", str(params), "split"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "pneumoseg split: error: 3 training images cannot fill 5 folds"
    assert not (tmp_path / "data" / "folds.csv").exists()


def test_cli_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = _project(tmp_path, labels_of(10, 2), [])
    (tmp_path / "processed" / "manifest.csv").unlink()
    assert cli.main(["-q", "--params", str(params), "split"]) == 1
    assert "run `pneumoseg convert` first" in capsys.readouterr().err


def test_duplicate_image_ids_are_refused_by_name(tmp_path: Path) -> None:
    """A manifest or folds file that names an image twice would collapse silently into one row
    (and a fold could hold a training image's twin): every reader refuses it, naming them."""
    from pneumoseg.artifacts import read_manifest

    manifest = write_manifest(tmp_path / "p" / "manifest.csv", labels_of(6, 2), ["t1"])
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join([*rows, rows[2], rows[5], rows[2]]) + "\n")  # img0001 x3
    first, second = rows[2].split(",")[0], rows[5].split(",")[0]
    for read in (read_train_labels, lambda m: read_manifest(m.parent)):
        with pytest.raises(ValueError, match="2 duplicate ImageId") as err:
            read(manifest)
        assert f"{first} (lines 3, 9, 11)" in str(err.value) and f"{second} (lines 6, 10)" in str(
            err.value
        )
    folds = tmp_path / "folds.csv"
    folds.write_text("ImageId,fold,has_mask\na,0,1\nb,1,0\na,1,1\n")
    with pytest.raises(ValueError, match=r"folds.csv: 1 duplicate ImageId\(s\): a \(lines 2, 4\)"):
        read_folds(folds)
