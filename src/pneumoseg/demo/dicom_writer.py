"""Writing real DICOM files (pydicom 3): the demo set and the tests' fixtures use this one
writer. Pixels are stored in one of :data:`TRANSFER_SYNTAXES`: uncompressed (explicit or
implicit VR little endian), JPEG Baseline (8-bit, Pillow), RLE Lossless (the fast pylibjpeg-rle
encoder) or JPEG 2000 Lossless; the SOP Instance UID (= the SIIM ImageId) is kept."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import FileDataset

TRANSFER_SYNTAXES = ("explicit", "implicit", "jpeg_baseline", "rle", "j2k")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def file_dataset(
    path: str | Path, sop_uid: str, sop_class: str = SECONDARY_CAPTURE, name: str | None = None
) -> FileDataset:
    """An empty dataset with its file meta (explicit VR little endian until pixels say
    otherwise) and SOP class/instance UIDs."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if name:
        meta.ImplementationVersionName = name
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def set_pixels(
    ds: FileDataset,
    stored: np.ndarray,
    photometric: str,
    bits: int,
    transfer_syntax: str = "explicit",
    jpeg_quality: int = 95,
) -> None:
    """Store ``stored`` (uint8 for 8 bits, else uint16) in ``transfer_syntax``."""
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {TRANSFER_SYNTAXES}")
    if transfer_syntax == "jpeg_baseline" and bits != 8:
        raise ValueError("JPEG baseline is 8-bit only")
    ds.set_pixel_data(stored, photometric, bits, generate_instance_uid=False)
    if transfer_syntax == "jpeg_baseline":
        from PIL import Image
        from pydicom.encaps import encapsulate

        buf = io.BytesIO()
        Image.fromarray(stored, mode="L").save(buf, format="JPEG", quality=jpeg_quality)
        frame = buf.getvalue()
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{stored.size / len(frame):.2f}"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    elif transfer_syntax == "rle":  # pylibjpeg-rle: pydicom's own encoder is ~20x slower
        ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    elif transfer_syntax == "j2k":
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    elif transfer_syntax == "implicit":
        from pydicom.uid import ImplicitVRLittleEndian

        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def stored_values(image: np.ndarray, photometric: str, bits: int) -> np.ndarray:
    """The stored pixel values whose display (MONOCHROME2 sense, air dark) is ``image``."""
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
    tags: dict[str, Any] | None = None,
    sex: str = "M",
    age: str = "038Y",
    view_position: str = "PA",
    sop_instance_uid: str | None = None,
    pixel_data: bool = True,
    stored: np.ndarray | None = None,
    jpeg_quality: int = 95,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``image`` (uint8, 2-D, air dark) as a CR chest DICOM at ``path``.

    ``bits`` > 8 scales the values to the ``bits``-bit range (stored as uint16); MONOCHROME1
    stores the inverted values so the rendering is unchanged; ``stored`` gives raw stored values
    instead. ``window`` adds WindowCenter/WindowWidth in stored units; ``tags`` and ``extra``
    set further header keywords (``tags`` first). ``pixel_data=False`` writes a header-only
    DICOM. The SOP Instance UID is the file stem when that is a valid UID, else a fresh one.
    """
    from pydicom.uid import generate_uid

    if image.ndim != 2:
        raise ValueError("image must be 2-D")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = sop_instance_uid or (
        path.stem if re.fullmatch(r"[0-9]+(\.[0-9]+)*", path.stem) else generate_uid()
    )
    arr = stored if stored is not None else stored_values(image, photometric, bits)
    ds = file_dataset(path, sop_uid)
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    ds.PatientSex = sex
    ds.PatientAge = age
    ds.ViewPosition = view_position
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if pixel_data:
        set_pixels(ds, np.ascontiguousarray(arr), photometric, bits, transfer_syntax, jpeg_quality)
    else:
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
    ds.save_as(path, enforce_file_format=True)
    return path
