"""Shared test setup: offline environment flags and synthetic DICOM fixtures.

``make_dicom(path, image, ...)`` writes a real DICOM file (pydicom 3) whose header carries
distinctive identifying values (:data:`IDENTIFYING`) so de-identification can be checked by
grepping outputs; ``radiograph(size, seed)`` draws a chest-like uint8 picture whose asymmetry
(marker top-left, mediastinum right of centre) reveals flips and inversions.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engines import Postgres, running_postgres
from pipeline_helpers import DvcProject, Pipeline, probed_pipeline, reproduced_project

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "pneumoseg-tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "pneumoseg-tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
}.items():
    os.environ.setdefault(_key, _value)

# Identifying header values written by make_dicom; none may ever appear in an output file.
IDENTIFYING: dict[str, str] = {
    "PatientName": "SECRET^NAME",
    "PatientID": "PID-SECRET-0451",
    "PatientBirthDate": "19450101",
    "StudyDate": "20170823",
    "SeriesDate": "20170824",
    "AcquisitionDate": "20170825",
    "ContentDate": "20170826",
    "StudyTime": "134501",
    "InstitutionName": "SECRET HOSPITAL",
    "InstitutionAddress": "1 Secret Street, Hiddentown",
    "AccessionNumber": "ACC-SECRET-77",
    "ReferringPhysicianName": "DR^SECRET^REFERRER",
    "StudyID": "STUDY-SECRET-9",
    "StudyInstanceUID": "1.2.826.0.1.3680043.10.999.4242.1",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.10.999.4242.2",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.10.999.4242.3",
}

TRANSFER_SYNTAXES = ("explicit", "implicit", "jpeg_baseline", "rle", "j2k")

# Geometry of radiograph(), as fractions of the side: tests check these regions.
MARKER = ((0.02, 0.10), (0.02, 0.10))  # (rows, cols): bright square, top-left
LEFT_LUNG_COLS = (0.14, 0.48)  # image-left lung (dark), wide
MEDIASTINUM_COLS = (0.52, 0.66)  # bright, right of centre (its mirror image is lung)
RIGHT_LUNG_COLS = (0.70, 0.86)  # image-right lung (dark), narrow
LUNG_ROWS = (0.22, 0.80)


def region(size: int, rows: tuple[float, float], cols: tuple[float, float]) -> tuple[slice, slice]:
    """Pixel slices of a fractional (rows, cols) box of a size x size image."""
    return (
        slice(int(rows[0] * size), int(rows[1] * size)),
        slice(int(cols[0] * size), int(cols[1] * size)),
    )


def radiograph(size: int = 256, seed: int = 0) -> np.ndarray:
    """A chest-like uint8 image: bright body, two dark lungs of different widths, a bright
    mediastinum right of centre and a bright square marker in the top-left corner.

    Smooth gradients and mild noise give the values a wide spread (so percentile scaling and
    lossy codecs behave as on real films); ``seed`` only changes the noise and lung texture.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = 40.0 + 30.0 * yy  # air/background, darker at the top
    body = (np.abs(xx - 0.5) < 0.45) & (yy > 0.12)
    img[body] = 150.0 + 40.0 * yy[body]
    for c0, c1 in (LEFT_LUNG_COLS, RIGHT_LUNG_COLS):
        lung = (xx >= c0) & (xx < c1) & (yy >= LUNG_ROWS[0]) & (yy < LUNG_ROWS[1])
        img[lung] = 55.0 + 50.0 * (yy[lung] - LUNG_ROWS[0])
    medi = (xx >= MEDIASTINUM_COLS[0]) & (xx < MEDIASTINUM_COLS[1]) & (yy >= 0.15) & (yy < 0.9)
    img[medi] = 215.0
    # ribs: gentle periodic texture inside the lungs
    lungs = (img < 110) & body
    img[lungs] += 12.0 * np.sin(yy[lungs] * 60.0 + rng.uniform(0, np.pi))
    img[region(size, *MARKER)] = 250.0
    img += rng.normal(0.0, 3.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _stored_values(image: np.ndarray, photometric: str, bits: int) -> np.ndarray:
    """The stored pixel values whose display (MONOCHROME2 sense) is ``image``."""
    top = (1 << bits) - 1
    values = np.round(image.astype(np.float64) * top / 255.0)
    if photometric == "MONOCHROME1":
        values = top - values
    return values.astype(np.uint8 if bits <= 8 else np.uint16)


def write_dicom(
    path: str | Path,
    image: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    transfer_syntax: str = "explicit",
    window: tuple[float, float] | None = None,
    patient_name: str = IDENTIFYING["PatientName"],
    sex: str = "M",
    age: str = "038Y",
    view_position: str = "PA",
    sop_instance_uid: str | None = None,
    pixel_data: bool = True,
    stored: np.ndarray | None = None,
    jpeg_quality: int = 95,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``image`` (uint8, 2-D, air dark) as a real DICOM file at ``path``.

    ``bits`` > 8 scales the values to the ``bits``-bit range (stored as uint16);
    MONOCHROME1 stores the inverted values so the rendering is unchanged. ``window`` adds
    WindowCenter/WindowWidth in stored units. ``stored`` bypasses the scaling (raw stored values).
    ``transfer_syntax``: explicit / implicit (uncompressed little endian), jpeg_baseline
    (Pillow-encoded, 8-bit only), rle (RLE Lossless) or j2k (JPEG 2000 Lossless).
    ``pixel_data=False`` writes a header-only DICOM. The SOP Instance UID is the file stem
    (SIIM: stem = ImageId) when that is a valid UID, else a fresh one. ``extra`` sets further
    header keywords.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        RLELossless,
        generate_uid,
    )

    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {TRANSFER_SYNTAXES}")
    if image.ndim != 2:
        raise ValueError("image must be 2-D")
    if transfer_syntax == "jpeg_baseline" and bits != 8:
        raise ValueError("JPEG baseline is 8-bit only")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = sop_instance_uid or (
        path.stem if re.fullmatch(r"[0-9]+(\.[0-9]+)*", path.stem) else generate_uid()
    )
    arr = stored if stored is not None else _stored_values(image, photometric, bits)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if transfer_syntax == "implicit" else ExplicitVRLittleEndian
    )
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)

    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    for keyword, value in IDENTIFYING.items():
        setattr(ds, keyword, value)
    ds.PatientName = patient_name
    ds.PatientSex = sex
    ds.PatientAge = age
    ds.ViewPosition = view_position
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1

    ds.Rows, ds.Columns = (int(n) for n in arr.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    if pixel_data:
        if transfer_syntax == "jpeg_baseline":
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=jpeg_quality)
            ds.PixelData = encapsulate([buf.getvalue()])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
            ds.LossyImageCompression = "01"
        else:
            ds.PixelData = np.ascontiguousarray(arr).tobytes()
            ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
            if transfer_syntax == "rle":
                ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
            elif transfer_syntax == "j2k":
                ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def make_dicom() -> Callable[..., Path]:
    """Factory: ``make_dicom(path, image_uint8_2d, *, photometric, bits, transfer_syntax,
    window, patient_name, ...)`` -> path (see :func:`write_dicom`)."""
    return write_dicom


@pytest.fixture(name="radiograph")
def radiograph_fixture() -> Callable[..., np.ndarray]:
    """Factory: ``radiograph(size, seed)`` -> uint8 chest-like image (see :func:`radiograph`)."""
    return radiograph


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tiny demo project after one run of every stage (trained once for the whole test
    run); tests that change files work on ``tiny_pipeline.copy(tmp_path / "p")``."""
    return probed_pipeline(tmp_path_factory.mktemp("tiny") / "p")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server on 127.0.0.1 for the whole test run (see tests/engines.py)."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory: pytest.TempPathFactory) -> DvcProject:
    """A git + DVC tiny project after one real `dvc repro` from nothing, committed (tag
    ``base``); tests work on ``dvc_project.copy(tmp_path / "p")``."""
    return reproduced_project(tmp_path_factory.mktemp("dvc") / "p")
