"""Reading chest X-ray DICOMs into display-ready uint8 images: the one decoding path shared by
conversion, prediction and serving.

Only non-identifying header fields ever leave this module (:data:`SAFE_FIELDS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SAFE_FIELDS = (
    "sex",
    "age",
    "view_position",
    "modality",
    "photometric",
    "bits_stored",
    "transfer_syntax",
)


class DicomReadError(Exception):
    """A file that cannot be turned into an image; ``str(err)`` is a one-line reason."""


@dataclass
class DicomImage:
    """A decoded radiograph: uint8, air dark, at the DICOM's own Rows x Columns."""

    image: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def _age(value: Any) -> str:
    """PatientAge ('038Y', '38', '6M') as whole years; ages over 89 become '90+' (HIPAA)."""
    match = re.fullmatch(r"\s*0*(\d+)\s*([YMWD]?)\s*", str(value or ""))
    if not match:
        return ""
    number, unit = int(match.group(1)), match.group(2) or "Y"
    years = {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]
    return "90+" if years >= 90 else str(years)


def safe_meta(ds: Any) -> dict[str, Any]:
    """The non-identifying fields of a dataset (see :data:`SAFE_FIELDS`)."""
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "sex": sex if sex in ("M", "F", "O") else "",
        "age": _age(ds.get("PatientAge")),
        "view_position": view if re.fullmatch(r"[A-Z]{1,4}", view) else "",
        "modality": str(ds.get("Modality", "") or "")[:4],
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "transfer_syntax": tsyntax.name if tsyntax is not None else "",
    }


def to_uint8(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Map stored pixel values to uint8 with air dark.

    8-bit MONOCHROME2 without a VOI passes through unchanged (the SIIM case). Otherwise the
    modality LUT is applied (pydicom), then, as DICOM PS3.3 C.11.2 defines them:

    * a VOI LUT Sequence: indexed by the modality output as integers (values below the first
      mapped one take the first entry, above the last the last), its ``2**n - 1`` output range
      (n = the LUT Descriptor's bits per entry) mapped linearly to 0..255;
    * else the first window (``VOILUTFunction`` LINEAR, LINEAR_EXACT or SIGMOID, pydicom's
      implementation), its output range mapped linearly to 0..255;
    * else a robust 0.5-99.5 percentile stretch.

    MONOCHROME1 is inverted last.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = cv2.cvtColor(arr.astype(np.uint8), cv2.COLOR_RGB2GRAY)
        photometric = "MONOCHROME2"
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    has_voi_lut = "VOILUTSequence" in ds
    bits = int(ds.get("BitsStored", 8) or 8)
    if bits <= 8 and arr.dtype == np.uint8 and not (has_window or has_voi_lut):
        out = arr
    else:
        values = apply_modality_lut(arr, ds)
        if has_voi_lut:  # the LUT is indexed by integers: a float modality output is floored
            index = np.floor(values).astype(np.int64) if values.dtype.kind == "f" else values
            values = apply_voi_lut(index, ds, prefer_lut=True).astype(np.float64)
            lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        elif has_window:
            values = apply_voi_lut(values.astype(np.float64), ds, prefer_lut=False)
            # the window's output range: what it gives far below and far above the window
            with np.errstate(over="ignore"):  # SIGMOID's exp far from the window
                ends = apply_voi_lut(np.array([-(2.0**40), 2.0**40]), ds, prefer_lut=False)
            lo, hi = float(np.min(ends)), float(np.max(ends))
        else:
            values = values.astype(np.float64)
            lo, hi = np.percentile(values, [0.5, 99.5])
        scaled = np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        out = np.round(scaled * 255.0).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return np.ascontiguousarray(out)


MAX_PIXELS = 8192 * 8192  # Rows x Columns x frames a DICOM may declare (the served model: a param)
INDEX_NAMES = ("DICOMDIR",)  # media indexes: DICOM files that hold no image


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM file by its content: ``DICM`` after the 128-byte preamble of
    DICOM Part 10, whatever its name (hospital exports: ``IMG.DCM``, no extension at all). A
    ``.dcm`` file without it counts too (the reader then says what is wrong with it)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def image_id_of(path: Path) -> str:
    """A DICOM file's ImageId: its name without ``.dcm`` (any case); a file without that
    extension keeps its whole name (exports named by SOP Instance UID have dots in it)."""
    return path.name[:-4] if path.suffix.lower() == ".dcm" else path.name


def find_dicom_files(root: Path) -> tuple[list[Path], list[Path]]:
    """Every DICOM file below ``root`` (recursively, sorted) by its content, and every other
    file found there (csv files, notes, ``DICOMDIR`` indexes): the callers report those."""
    dicoms: list[Path] = []
    others: list[Path] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        is_image = path.name.upper() not in INDEX_NAMES and is_dicom_file(path)
        (dicoms if is_image else others).append(path)
    return dicoms, others


def describe_others(others: list[Path], root: Path, limit: int = 5) -> str:
    """``N files ... (a, b, ... and K more)``: the one line that reports non-DICOM files."""
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else p.name for p in others]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    shown = ", ".join(names[:limit]) + more
    return f"{len(names)} file(s) under {root} are not DICOM images, left out: {shown}"


def read_dicom(path: str | Path, max_pixels: int = MAX_PIXELS) -> DicomImage:
    """Read one DICOM file; raise :class:`DicomReadError` with a one-line reason on failure.
    An image that declares more than ``max_pixels`` (Rows x Columns x frames) is refused before
    its pixel data is decoded (a decompression bomb declares a huge image in a tiny file)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except InvalidDicomError:
        raise DicomReadError("not a DICOM file (no DICM preamble/header)") from None
    except Exception as exc:  # truncated headers raise various errors
        raise DicomReadError(f"unreadable DICOM header: {type(exc).__name__}") from None
    if "PixelData" not in ds:
        raise DicomReadError("DICOM has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # missing or corrupt size elements
        raise DicomReadError("DICOM has no valid Rows/Columns") from None
    if rows * cols * max(frames, 1) > max_pixels:
        raise DicomReadError(
            f"image of {rows} x {cols} x {frames} frame(s) exceeds the limit of {max_pixels} "
            "pixels (not decoded)"
        )
    try:
        arr = ds.pixel_array
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # native decoders raise more than Exception (a Rust panic)
        reason = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise DicomReadError(
            f"pixel data cannot be decoded: {type(exc).__name__}: {reason}".rstrip(": ")
        ) from None
    if arr.ndim == 3 and arr.shape[-1] != 3:
        arr = arr[0]  # multi-frame: first frame
    if arr.ndim != 2 and not (arr.ndim == 3 and arr.shape[-1] == 3):
        raise DicomReadError(f"unexpected pixel array shape {arr.shape}")
    try:  # header elements are parsed lazily: a corrupt one fails only when first read
        return DicomImage(image=to_uint8(arr, ds), meta=safe_meta(ds))
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DicomReadError(f"invalid DICOM header value: {reason}") from None


def prepare_image(image: np.ndarray, size: int, clahe: Any | None = None) -> np.ndarray:
    """Optional CLAHE (``clahe.enabled``), then area-resize to ``size`` x ``size`` (uint8)."""
    if clahe is not None and getattr(clahe, "enabled", False):
        grid = int(clahe.tile_grid)
        image = cv2.createCLAHE(clipLimit=float(clahe.clip_limit), tileGridSize=(grid, grid)).apply(
            image
        )
    if image.shape != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a 0/1 mask to ``size`` x ``size``."""
    if mask.shape == (size, size):
        return mask
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
