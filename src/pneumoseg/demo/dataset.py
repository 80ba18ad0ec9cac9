"""The synthetic, SIIM-ACR-like pneumothorax data set written as real DICOM files (the ``demo``
stage's work).

The real SIIM data cannot be downloaded here, so the pipeline's default data set is generated:
procedural frontal chest radiographs (body, lungs, mediastinum and heart, clavicles, ribs,
diaphragm, lung vessels, devices and markers, exposure/gamma/illumination/noise) with
pneumothorax crescents at the lung periphery on ``positive_fraction`` of the images.

Layout (as in the competition)::

    <out>/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm
    <out>/dicom-images-test/...
    <out>/train-rle.csv          ImageId, EncodedPixels   (relative RLE, one row per region)
    <out>/test-truth.csv         same format, the hidden truth of the test images
    <out>/sample_submission.csv  ImageId,EncodedPixels    (every test image "-1")

The DICOMs mix what a converter meets in the wild: 8-bit JPEG Baseline (most, like SIIM),
uncompressed, RLE Lossless, JPEG 2000 Lossless, MONOCHROME1, 12-16-bit pixels with and
without a VOI window, and filled-in (fake, greppable) identifying patient tags. Every format
of an image decodes - correctly - to the same picture. Everything is seeded: one seed, the
same bytes.
"""

from __future__ import annotations

import csv
import datetime as dt
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoseg.demo.dicom_writer import file_dataset, set_pixels
from pneumoseg.demo.phantom import SPLIT_CODE, Radiograph, seed_sequence, synthesize
from pneumoseg.params import DemoParams
from pneumoseg.progress import progress_bar
from pneumoseg.rle import rle_encode

if TYPE_CHECKING:
    from pydicom.dataset import FileDataset

TRAIN_DIR = "dicom-images-train"
TEST_DIR = "dicom-images-test"
TRAIN_CSV = "train-rle.csv"
TRUTH_CSV = "test-truth.csv"
SUBMISSION_CSV = "sample_submission.csv"
RLE_HEADER = ("ImageId", " EncodedPixels")  # SIIM's header has the leading space

INSTITUTION = "DEMO GENERAL HOSPITAL"
UID_ROOT = "1.2.276.0.7230010.3.1"  # the root of SIIM's UIDs
UID_SITE = "8323329"

# Pixel formats: name -> share of the images. Every format appears at least once in a split
# with at least len(FORMATS) images.
FORMATS: dict[str, float] = {
    "jpeg8": 0.60,  # 8-bit MONOCHROME2, JPEG Baseline (like SIIM)
    "raw8": 0.15,  # 8-bit MONOCHROME2, Explicit VR Little Endian
    "rle8": 0.05,  # 8-bit MONOCHROME2, RLE Lossless
    "rle16": 0.05,  # 16-bit MONOCHROME2, RLE Lossless, rescale + window
    "mono1_raw": 0.05,  # 12-bit MONOCHROME1 (inverted), window, uncompressed
    "mono1_j2k": 0.05,  # 12-bit MONOCHROME1 (inverted), window, JPEG 2000 Lossless
    "hi_novoi": 0.05,  # 15/16-bit MONOCHROME2 without any VOI, uncompressed or JPEG 2000
}


@dataclass(frozen=True)
class PlannedImage:
    """One image of the plan."""

    split: str
    index: int
    positive: bool
    fmt: str
    old: bool  # patient aged over 89


def format_list(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` format names in the proportions of :data:`FORMATS` (largest remainder), each at
    least once when ``n >= len(FORMATS)``, in a seeded order."""
    names = list(FORMATS)
    want = np.array([FORMATS[k] for k in names]) * n
    counts = np.floor(want).astype(int)
    if n >= len(names):
        counts = np.maximum(counts, 1)
    while counts.sum() < n:
        counts[int(np.argmax(want - counts))] += 1
    while counts.sum() > n:
        counts[int(np.argmax(counts))] -= 1
    out = [name for name, c in zip(names, counts, strict=True) for _ in range(c)]
    return [out[i] for i in rng.permutation(n)]


def plan_images(cfg: DemoParams) -> list[PlannedImage]:
    """Every image of the set: which are positive (exactly ``round(n * fraction)`` per split),
    their pixel formats and which patients are over 89 (at least one per split of 5+)."""
    items: list[PlannedImage] = []
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        code = SPLIT_CODE[split]
        rng = np.random.default_rng(seed_sequence(cfg.seed, 100 + code))
        n_pos = int(round(n * cfg.positive_fraction))
        positives = set(rng.choice(n, size=n_pos, replace=False).tolist()) if n else set()
        formats = format_list(n, rng)
        old = set(np.flatnonzero(rng.random(n) < 0.03).tolist())
        if n >= 5:
            old.add(int(rng.integers(n)))
        items += [PlannedImage(split, i, i in positives, formats[i], i in old) for i in range(n)]
    return items


def image_number(seed: int, split: str, index: int, purpose: int, digits: int = 6) -> int:
    """A deterministic pseudo-random number for one image and purpose."""
    state = seed_sequence(seed, SPLIT_CODE[split], index, 1000 + purpose).generate_state(
        1, np.uint64
    )
    return int(state[0] % (10**digits))


def image_uids(seed: int, split: str, index: int) -> tuple[str, str, str]:
    """SIIM-like ``(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID)`` of image ``index`` of
    ``split`` ("train" or "test"); the SOPInstanceUID is the ImageId."""
    n = 1000 + 2 * index + SPLIT_CODE[split]
    stamp = 1517875000 + image_number(seed, split, index, 5, digits=5)
    study, series, sop = (
        f"{UID_ROOT}.{kind}.{UID_SITE}.{n}.{stamp}.{image_number(seed, split, index, kind)}"
        for kind in (2, 3, 4)
    )
    return study, series, sop


def age_string(age: int, rng: np.random.Generator) -> str:
    """SIIM writes plain numbers ('38'); DICOM's AS form ('038Y') appears too."""
    return f"{age:03d}Y" if rng.random() < 0.3 else str(age)


def demo_header(cfg: DemoParams, item: PlannedImage, sex: str, path: Path) -> FileDataset:
    """A dataset with file meta, patient/study/series tags and the image geometry (no pixels)."""
    from pydicom import config
    from pydicom.dataelem import DataElement
    from pydicom.uid import ComputedRadiographyImageStorage, SecondaryCaptureImageStorage

    rng = np.random.default_rng(seed_sequence(cfg.seed, SPLIT_CODE[item.split], item.index, 1))
    study_uid, series_uid, sop_uid = image_uids(cfg.seed, item.split, item.index)
    number = 1000 + 2 * item.index + SPLIT_CODE[item.split]
    modality = "DX" if rng.random() < 0.2 else "CR"
    sop_class = (
        ComputedRadiographyImageStorage
        if modality == "CR" and item.fmt != "jpeg8" and rng.random() < 0.7
        else SecondaryCaptureImageStorage
    )
    ds = file_dataset(path, sop_uid, sop_class, "PNEUMOSEG_DEMO")

    age = int(rng.integers(90, 98)) if item.old else int(np.clip(rng.normal(52, 17), 18, 89))
    study_date = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 5 * 365)))
    birth = study_date - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 360)))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY"]
        if sop_class != SecondaryCaptureImageStorage
        else ["DERIVED", "SECONDARY"]
    )
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = (
        f"{int(rng.integers(7, 20)):02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}"
    )
    ds.AccessionNumber = f"DEMOACC{image_number(cfg.seed, item.split, item.index, 6, digits=8):08d}"
    ds.Modality = modality
    if sop_class == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"
    ds.Manufacturer = "PNEUMOSEG SYNTHETIC"
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = "1 DEMO STREET, DEMOVILLE"
    ds.ReferringPhysicianName = f"DEMO^REFERRER^DR{number % 37:02d}"
    ds.SeriesDescription = f"view: {'AP' if rng.random() < 0.35 else 'PA'}"
    ds.PatientName = f"DEMO^PATIENT{number:05d}"
    ds.PatientID = f"DEMOPID-{image_number(cfg.seed, item.split, item.index, 7, digits=10):010d}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sex
    # plain numbers are what SIIM has but not valid AS: bypass pydicom's value validation
    ds.add(DataElement(0x00101010, "AS", age_string(age, rng), validation_mode=config.IGNORE))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = ds.SeriesDescription.split()[-1]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"DEMO{number:05d}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    spacing = round(0.14 * 1024 / cfg.size, 4)
    ds.PixelSpacing = [spacing, spacing]
    return ds


def set_demo_pixels(ds: FileDataset, rad: Radiograph, fmt: str, rng: np.random.Generator) -> None:
    """Store the radiograph in ``ds`` in pixel format ``fmt`` (see :data:`FORMATS`)."""
    img8 = rad.display()
    value = np.clip(rad.image, 0.0, 1.0).astype(np.float64)
    if fmt in ("jpeg8", "raw8", "rle8"):
        syntax = {"jpeg8": "jpeg_baseline", "raw8": "explicit", "rle8": "rle"}[fmt]
        set_pixels(ds, img8, "MONOCHROME2", 8, syntax)
        return
    if fmt == "rle16":  # 16 bits, a rescale intercept and a window in rescaled units
        lo, hi = float(rng.integers(800, 3000)), float(rng.integers(60000, 65400))
        stored = np.round(lo + value * (hi - lo)).astype(np.uint16)
        set_pixels(ds, stored, "MONOCHROME2", 16, "rle")
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.WindowCenter = round((lo + hi) / 2 - 1024, 1)
        ds.WindowWidth = round(hi - lo, 1)
        return
    if fmt in ("mono1_raw", "mono1_j2k"):  # inverted: air is bright in the stored values
        lo, hi = float(rng.integers(40, 300)), float(rng.integers(3700, 4060))
        stored = np.round(lo + (1.0 - value) * (hi - lo)).astype(np.uint16)
        syntax = "j2k" if fmt == "mono1_j2k" else "explicit"
        set_pixels(ds, stored, "MONOCHROME1", 12, syntax)
        ds.WindowCenter = round((lo + hi) / 2, 1)
        ds.WindowWidth = round(hi - lo, 1)
        return
    if fmt == "hi_novoi":  # 15/16 bits without any VOI: readers must scale by themselves
        bits = 15 if rng.random() < 0.5 else 16
        top = 2**bits - 1
        lo, hi = top * rng.uniform(0.01, 0.05), top * rng.uniform(0.93, 0.99)
        stored = np.round(lo + value * (hi - lo)).astype(np.uint16)
        set_pixels(ds, stored, "MONOCHROME2", bits, "j2k" if rng.random() < 0.5 else "explicit")
        return
    raise ValueError(f"unknown demo pixel format {fmt!r}")


def write_rle_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """SIIM's RLE csv: header ``ImageId, EncodedPixels`` and ``<id>, <rle>`` rows."""
    with path.open("w", newline="") as fh:
        fh.write(",".join(RLE_HEADER) + "\n")
        for image_id, rle in rows:
            fh.write(f"{image_id}, {rle}\n")


def clean(out: Path) -> None:
    """Remove what a previous run wrote (only our folders and csv files)."""
    for folder in (TRAIN_DIR, TEST_DIR):
        if (out / folder).is_dir():
            shutil.rmtree(out / folder)
    for old in out.glob("dicom-images-*"):
        if old.is_dir():
            shutil.rmtree(old)
    for name in (TRAIN_CSV, TRUTH_CSV, SUBMISSION_CSV):
        (out / name).unlink(missing_ok=True)


def generate_demo(
    cfg: DemoParams, out_dir: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Write the demo set to ``out_dir`` (default ``cfg.out_dir``) and return a summary:
    image counts (train, test, positive), lesion regions, transfer syntaxes, photometric
    interpretations and pixel formats used (name -> count), files and bytes written."""
    from pydicom.uid import UID

    started = time.perf_counter()
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean(out)
    plan = plan_images(cfg)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    syntaxes: Counter[str] = Counter()
    photometric: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    n_bytes = 0
    regions = 0
    for item in progress_bar(plan, desc="demo", bars_allowed=progress):
        rad = synthesize(cfg.seed, item.split, item.index, cfg.size, item.positive)
        study, series, sop = image_uids(cfg.seed, item.split, item.index)
        folder = out / (TRAIN_DIR if item.split == "train" else TEST_DIR) / study / series
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{sop}.dcm"
        ds = demo_header(cfg, item, rad.sex, path)
        pix_rng = np.random.default_rng(
            seed_sequence(cfg.seed, SPLIT_CODE[item.split], item.index, 2)
        )
        set_demo_pixels(ds, rad, item.fmt, pix_rng)
        ds.save_as(path, enforce_file_format=True)
        n_bytes += path.stat().st_size
        syntaxes[UID(ds.file_meta.TransferSyntaxUID).name] += 1
        photometric[str(ds.PhotometricInterpretation)] += 1
        formats[item.fmt] += 1
        regions += len(rad.lesions)
        encoded = [rle_encode(m.astype(np.uint8)) for m in rad.lesions] or ["-1"]
        rows[item.split].append((sop, "\n".join(encoded)))

    # SIIM's csv is not sorted: shuffle images (seeded), keep an image's rows together
    for split, name in (("train", TRAIN_CSV), ("test", TRUTH_CSV)):
        order = np.random.default_rng(seed_sequence(cfg.seed, 300 + SPLIT_CODE[split])).permutation(
            len(rows[split])
        )
        flat = [(rows[split][i][0], rle) for i in order for rle in rows[split][i][1].split("\n")]
        write_rle_csv(out / name, flat)
    with (out / SUBMISSION_CSV).open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["ImageId", "EncodedPixels"])
        writer.writerows([image_id, "-1"] for image_id, _ in rows["test"])
    n_bytes += sum((out / n).stat().st_size for n in (TRAIN_CSV, TRUTH_CSV, SUBMISSION_CSV))
    positive_train = sum(1 for i in plan if i.split == "train" and i.positive)
    positive_test = sum(1 for i in plan if i.split == "test" and i.positive)
    return {
        "out_dir": str(out),
        "train": cfg.n_train,
        "test": cfg.n_test,
        "positive_train": positive_train,
        "positive_test": positive_test,
        "positive": positive_train + positive_test,
        "regions": regions,
        "transfer_syntaxes": dict(sorted(syntaxes.items())),
        "photometric": dict(sorted(photometric.items())),
        "formats": dict(sorted(formats.items())),
        "files": len(plan) + 3,
        "bytes": n_bytes,
        "seconds": round(time.perf_counter() - started, 2),
    }
