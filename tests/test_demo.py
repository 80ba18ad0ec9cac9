"""The synthetic SIIM-like demo set: real DICOMs, SIIM layout and csv files, deterministic.

Run this file as a script to render a few images with their mask outlines for a visual check::

    .venv/bin/python tests/test_demo.py [out_dir] [--size 512]   # PNGs in /tmp/demo_preview/
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from pneumoseg.demo import dataset as demo
from pneumoseg.demo.dataset import generate_demo, image_uids
from pneumoseg.demo.phantom import synthesize
from pneumoseg.params import DemoParams, Params
from pneumoseg.rle import decode_rows, read_rle_csv
from pneumoseg.stages import demo as demo_stage

TINY = DemoParams(n_train=16, n_test=4, size=128, positive_fraction=0.22, seed=11)
SC_OR_CR = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.1"}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def dicom_files(out: Path, split: str) -> dict[str, Path]:
    """ImageId -> path of every DICOM of a split."""
    return {p.stem: p for p in (out / f"dicom-images-{split}").rglob("*.dcm")}


def decode(ds: pydicom.Dataset) -> np.ndarray:
    """Reference decoding to uint8 with air dark: rescale, window (or a 0.5-99.5 percentile
    stretch when a >8-bit image has no window), MONOCHROME1 inverted."""
    arr = ds.pixel_array.astype(np.float64)
    arr = arr * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if "WindowCenter" in ds:
        center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        arr = np.clip((arr - (center - width / 2)) / width, 0, 1) * 255
    elif int(ds.BitsStored) > 8:
        lo, hi = np.percentile(arr, [0.5, 99.5])
        arr = np.clip((arr - lo) / (hi - lo), 0, 1) * 255
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = 255 - arr
    return np.round(arr).astype(np.uint8)


def index_of(cfg: DemoParams) -> dict[str, tuple[str, int]]:
    """ImageId -> (split, index) of every image of a config."""
    out = {}
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        for i in range(n):
            out[image_uids(cfg.seed, split, i)[2]] = (split, i)
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under root."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def save_previews(out: Path, dest: Path, n: int = 6) -> list[Path]:
    """Render up to ``n`` training images (positives first) decoded from their DICOMs, with the
    csv masks outlined in red, as PNGs in ``dest``; returns the written paths."""
    import cv2

    dest.mkdir(parents=True, exist_ok=True)
    table = read_rle_csv(out / "train-rle.csv")
    files = dicom_files(out, "train")
    ids = sorted(files, key=lambda i: (table.rows[i][0][1] == "-1", i))[:n]
    written = []
    for k, image_id in enumerate(ids):
        ds = pydicom.dcmread(files[image_id])
        img = cv2.cvtColor(decode(ds), cv2.COLOR_GRAY2BGR)
        raw = img.copy()
        for _, rle in table.rows[image_id]:
            mask = decode_rows([(0, rle)], ds.Rows, ds.Columns, "relative", "csv", image_id)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(img, contours, -1, (0, 0, 255), 1)
        label = f"{ds.file_meta.TransferSyntaxUID.name[:24]} {ds.PhotometricInterpretation}"
        cv2.putText(img, label, (4, 14), cv2.FONT_HERSHEY_PLAIN, 0.9, (0, 255, 255), 1)
        path = dest / f"preview_{k}.png"
        cv2.imwrite(str(path), np.concatenate([raw, img], axis=1))
        written.append(path)
    return written


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "raw"
    return out, generate_demo(TINY, out, progress=False)


# ---------------------------------------------------------------------------------------------
# layout and csv files
# ---------------------------------------------------------------------------------------------


def test_layout_is_siim(demo_set: tuple[Path, dict]) -> None:
    out, summary = demo_set
    assert sorted(p.name for p in out.iterdir()) == [
        "dicom-images-test",
        "dicom-images-train",
        "sample_submission.csv",
        "test-truth.csv",
        "train-rle.csv",
    ]
    for split, n in (("train", TINY.n_train), ("test", TINY.n_test)):
        files = dicom_files(out, split)
        assert len(files) == n
        for image_id, path in files.items():
            assert path.relative_to(out).parts[0] == f"dicom-images-{split}"
            assert len(path.relative_to(out).parts) == 4  # split / study / series / id.dcm
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.SOPInstanceUID == image_id == ds.file_meta.MediaStorageSOPInstanceUID
            assert ds.SeriesInstanceUID == path.parent.name
            assert ds.StudyInstanceUID == path.parent.parent.name
            assert image_id.startswith("1.2.276.0.7230010.3.1.4.8323329.")
            for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
                assert UID(uid).is_valid
    all_ids = set(dicom_files(out, "train")) | set(dicom_files(out, "test"))
    assert len(all_ids) == TINY.n_train + TINY.n_test
    assert summary["train"] == TINY.n_train and summary["test"] == TINY.n_test
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert summary["bytes"] == on_disk


def test_csv_files(demo_set: tuple[Path, dict]) -> None:
    out, summary = demo_set
    train_ids, test_ids = set(dicom_files(out, "train")), set(dicom_files(out, "test"))
    assert (out / "train-rle.csv").read_text().splitlines()[0] == "ImageId, EncodedPixels"
    assert (out / "test-truth.csv").read_text().splitlines()[0] == "ImageId, EncodedPixels"

    for name, ids, n in (
        ("train-rle.csv", train_ids, TINY.n_train),
        ("test-truth.csv", test_ids, TINY.n_test),
    ):
        table = read_rle_csv(out / name)
        assert set(table.rows) == ids  # every image, and only this split's images
        positives = [i for i, rows in table.rows.items() if rows[0][1] != "-1"]
        assert len(positives) == round(n * TINY.positive_fraction)
        for image_id, rows in table.rows.items():
            rles = [r for _, r in rows]
            if image_id in positives:
                assert 1 <= len(rles) <= 3 and "-1" not in rles
            else:
                assert rles == ["-1"]
    assert summary["positive_train"] == round(TINY.n_train * TINY.positive_fraction)
    assert summary["positive_test"] == round(TINY.n_test * TINY.positive_fraction)

    with (out / "sample_submission.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["ImageId", "EncodedPixels"]
    assert {r[0] for r in rows[1:]} == test_ids and len(rows) == TINY.n_test + 1
    assert all(r[1] == "-1" for r in rows[1:])


def test_masks_are_plausible_lesions(demo_set: tuple[Path, dict]) -> None:
    out, _ = demo_set
    where = index_of(TINY)
    regions = 0
    for name, split in (("train-rle.csv", "train"), ("test-truth.csv", "test")):
        table = read_rle_csv(out / name)
        files = dicom_files(out, split)
        for image_id, rows in table.rows.items():
            if rows[0][1] == "-1":
                continue
            ds = pydicom.dcmread(files[image_id])
            h, w = ds.Rows, ds.Columns
            for row in rows:  # every region alone
                area = decode_rows([row], h, w, "relative", name, image_id).mean()
                assert 0.0005 <= area <= 0.08
                regions += 1
            union = table.decode(image_id, h, w).astype(bool)
            assert 0.0005 <= union.mean() <= 0.08
            image = decode(ds).astype(float)
            assert image[union].mean() < image.mean() - 10  # air-dark lung, not body or bone
            lung = synthesize(TINY.seed, *where[image_id], TINY.size, True).lung
            assert lung[union].all()  # inside the lung fields
    assert regions > round(TINY.n_train * TINY.positive_fraction)  # some images have 2+ rows


def test_lesion_sizes_follow_the_siim_like_distribution() -> None:
    areas = []
    for i in range(60):
        areas += [m.mean() for m in synthesize(3, "train", i, 128, True).lesions]
    areas = np.array(areas)
    assert len(areas) > 60  # 1-3 regions per positive image
    assert areas.min() >= 0.0005 and areas.max() <= 0.08
    assert 0.003 < np.median(areas) < 0.015  # median around 0.8% of the image


# ---------------------------------------------------------------------------------------------
# the DICOMs
# ---------------------------------------------------------------------------------------------


def test_pixel_formats_mix_and_decode(demo_set: tuple[Path, dict]) -> None:
    out, summary = demo_set
    syntaxes, photometrics, bits = set(), set(), set()
    no_voi_high = 0
    for split in ("train", "test"):
        for path in dicom_files(out, split).values():
            ds = pydicom.dcmread(path)
            arr = ds.pixel_array
            assert arr.shape == (TINY.size, TINY.size)
            syntaxes.add(ds.file_meta.TransferSyntaxUID)
            photometrics.add(ds.PhotometricInterpretation)
            bits.add(int(ds.BitsStored))
            assert ds.SamplesPerPixel == 1 and ds.PixelRepresentation == 0
            assert ds.HighBit == ds.BitsStored - 1
            if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50":
                assert ds.BitsAllocated == 8 and ds.PhotometricInterpretation == "MONOCHROME2"
            if ds.BitsStored > 8:  # the radiograph spans most of the stored range
                assert int(arr.max()) - int(arr.min()) > 0.5 * 2 ** int(ds.BitsStored)
                if "WindowCenter" not in ds:
                    no_voi_high += 1
            if ds.PhotometricInterpretation == "MONOCHROME1":
                assert "WindowCenter" in ds and "WindowWidth" in ds
    assert len(syntaxes) >= 4
    assert {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.90",
    } <= syntaxes
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert 8 in bits and 12 in bits and bits & {15, 16}
    assert no_voi_high >= 1
    assert len(summary["transfer_syntaxes"]) == len(syntaxes)
    assert set(summary["formats"]) == set(demo.FORMATS)  # every format even in a tiny set


def test_every_format_decodes_to_the_same_picture(demo_set: tuple[Path, dict]) -> None:
    """Correct decoding (rescale, window, MONOCHROME1 inversion) gives the canonical 8-bit
    rendering; ignoring the photometric interpretation gives a negative."""
    out, _ = demo_set
    where = index_of(TINY)
    seen = set()
    for split in ("train", "test"):
        for image_id, path in dicom_files(out, split).items():
            ds = pydicom.dcmread(path)
            s, i = where[image_id]
            positive = (
                read_rle_csv(out / ("train-rle.csv" if s == "train" else "test-truth.csv")).rows[
                    image_id
                ][0][1]
                != "-1"
            )
            ref = synthesize(TINY.seed, s, i, TINY.size, positive).display().astype(float)
            got = decode(ds).astype(float)
            ts = ds.file_meta.TransferSyntaxUID
            if ts == "1.2.840.10008.1.2.4.50":  # lossy JPEG
                assert np.abs(got - ref).mean() < 1.5
                kind = "jpeg"
            elif "WindowCenter" in ds or ds.BitsStored == 8:  # exact up to rounding
                assert np.abs(got - ref).max() <= 1
                kind = f"exact{ds.BitsStored}"
            else:  # no VOI: the reader picks the contrast, the anatomy is the same
                assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99
                kind = "novoi"
            if ds.PhotometricInterpretation == "MONOCHROME1":
                naive = ds.pixel_array.astype(float).ravel()
                assert np.corrcoef(naive, ref.ravel())[0, 1] < -0.95
                kind = "mono1"
            seen.add(kind)
    assert {"jpeg", "exact8", "exact16", "novoi", "mono1"} <= seen


def test_header_tags(demo_set: tuple[Path, dict]) -> None:
    out, _ = demo_set
    ages = []
    names = set()
    for split in ("train", "test"):
        for path in dicom_files(out, split).values():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.Modality in ("CR", "DX")
            assert ds.SOPClassUID in SC_OR_CR
            assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
            assert ds.file_meta.ImplementationClassUID
            assert ds.BodyPartExamined == "CHEST"
            assert ds.ViewPosition in ("PA", "AP")
            assert ds.PatientSex in ("M", "F")
            assert ds.Rows == ds.Columns == TINY.size
            assert float(ds.PixelSpacing[0]) == pytest.approx(0.14 * 1024 / TINY.size, rel=1e-3)
            match = re.fullmatch(r"0?(\d{2,3})Y?", str(ds.PatientAge))
            assert match, ds.PatientAge
            ages.append(int(match.group(1)))
            assert str(ds.PatientName).startswith("DEMO^PATIENT")
            assert ds.InstitutionName == "DEMO GENERAL HOSPITAL"
            for keyword in (
                "PatientID",
                "PatientBirthDate",
                "StudyDate",
                "StudyTime",
                "ReferringPhysicianName",
                "AccessionNumber",
                "StudyID",
            ):
                assert str(ds.get(keyword, "")).strip(), keyword
            assert str(ds.PatientID).startswith("DEMO")
            names.add(str(ds.PatientName))
    assert max(ages) > 89  # de-identification must handle 90+
    assert min(ages) >= 18
    assert len(names) == TINY.n_train + TINY.n_test


# ---------------------------------------------------------------------------------------------
# determinism and reruns
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_set(
    demo_set: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = demo_set
    generate_demo(TINY, tmp_path / "again", progress=False)
    assert tree_bytes(tmp_path / "again") == tree_bytes(out)

    other = TINY.model_copy(update={"seed": TINY.seed + 1})
    generate_demo(other, tmp_path / "other", progress=False)
    assert set(dicom_files(tmp_path / "other", "train")).isdisjoint(dicom_files(out, "train"))
    first = pydicom.dcmread(next(iter(dicom_files(out, "train").values()))).pixel_array
    second = pydicom.dcmread(next(iter(dicom_files(tmp_path / "other", "train").values())))
    assert first.shape != second.pixel_array.shape or not np.array_equal(first, second.pixel_array)
    a = synthesize(TINY.seed, "train", 0, 64, False).image
    b = synthesize(TINY.seed + 1, "train", 0, 64, False).image
    assert not np.allclose(a, b)


def test_images_are_independent_of_set_size() -> None:
    """Each image is seeded by (seed, split, index) alone."""
    small = DemoParams(n_train=4, n_test=0, size=64, seed=5)
    big = DemoParams(n_train=40, n_test=8, size=64, seed=5)
    for cfg in (small, big):
        assert image_uids(cfg.seed, "train", 2) == image_uids(5, "train", 2)
    a = synthesize(5, "train", 2, 64, True)
    b = synthesize(5, "train", 2, 64, True)
    assert np.array_equal(a.image, b.image)
    assert all(np.array_equal(x, y) for x, y in zip(a.lesions, b.lesions, strict=True))


def test_rerun_leaves_no_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    generate_demo(TINY, out, progress=False)
    stray = out / "dicom-images-train" / "1.2.3" / "4.5.6" / "7.8.9.dcm"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"stale")
    (out / "dicom-images-extra").mkdir()
    (out / "notes.txt").write_text("not ours")

    smaller = TINY.model_copy(update={"n_train": 6, "n_test": 2, "seed": 99})
    summary = generate_demo(smaller, out, progress=False)
    assert not stray.exists() and not (out / "dicom-images-extra").exists()
    assert (out / "notes.txt").read_text() == "not ours"  # only our own outputs are removed
    assert len(dicom_files(out, "train")) == 6 and len(dicom_files(out, "test")) == 2
    assert set(read_rle_csv(out / "train-rle.csv").rows) == set(dicom_files(out, "train"))
    assert set(read_rle_csv(out / "test-truth.csv").rows) == set(dicom_files(out, "test"))
    assert summary["train"] == 6


def test_format_list_proportions() -> None:
    rng = np.random.default_rng(0)
    tiny = demo.format_list(7, rng)
    assert sorted(tiny) == sorted(demo.FORMATS)
    full = demo.format_list(384, rng)
    counts = {k: full.count(k) for k in demo.FORMATS}
    assert sum(counts.values()) == 384
    for name, share in demo.FORMATS.items():
        assert abs(counts[name] / 384 - share) < 0.01


def test_run_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = Params(demo=TINY.model_copy(update={"out_dir": str(tmp_path / "d"), "n_test": 0}))
    demo_stage.run(params, progress=False)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo: 16 train")
    assert len(dicom_files(tmp_path / "d", "train")) == 16
    assert read_rle_csv(tmp_path / "d" / "test-truth.csv").rows == {}


def test_module_does_not_import_torch_or_mlflow() -> None:
    import subprocess

    code = (
        "import sys; import pneumoseg.stages.demo, pneumoseg.demo.dataset; "
        "print(any(m.split('.')[0] in ('torch', 'mlflow') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_previews_render(demo_set: tuple[Path, dict], tmp_path: Path) -> None:
    written = save_previews(demo_set[0], tmp_path / "preview", n=3)
    assert len(written) == 3 and all(p.stat().st_size > 1000 for p in written)


if __name__ == "__main__":  # visual check: python tests/test_demo.py [out] [--size N]
    import argparse

    parser = argparse.ArgumentParser(description="render demo images with mask outlines")
    parser.add_argument("out", nargs="?", default="/tmp/demo_preview/data")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--n", type=int, default=8)
    args = parser.parse_args()
    cfg = DemoParams(n_train=24, n_test=4, size=args.size, seed=2019)
    print(generate_demo(cfg, args.out, progress=False))
    for p in save_previews(Path(args.out), Path("/tmp/demo_preview"), n=args.n):
        print(p)
