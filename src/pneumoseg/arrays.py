"""The training images and masks as uint8 arrays on disk, decoded once (stage ``arrays``).

Layout of ``arrays.out_dir``::

    ids.txt               ImageIds, one per line: row i of every array is ids[i]
    arrays.json           {"processed_size": the PNGs' side, "sizes": every size written}
    <size>/images.npy     (N, size, size) uint8 gray images
    <size>/masks.npy      (N, size, size) uint8 0/1 masks

Each array is the PNG path's result at that size (``read_gray`` of the processed PNG, area
resize, masks thresholded at 127), so training reads exactly what it read from the PNGs.
:class:`ArrayRows` reads single rows with ``os.pread`` at their offset in the ``.npy`` file:
no PNG decode while training, no per-process copy (the pages live once in the OS page cache,
shared by every DataLoader worker and DDP rank) and no mapping that would count the whole file
in a process's resident set. ``np.load(path, mmap_mode="r")`` opens the same files for viewing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pneumoseg.artifacts import image_path, mask_path, read_manifest
from pneumoseg.files import new_memmap, staged_dir
from pneumoseg.progress import progress_bar

IDS = "ids.txt"
INFO = "arrays.json"


def resize_gray(image: np.ndarray, size: int | None, mask: bool = False) -> np.ndarray:
    """``image`` at ``size`` x ``size`` (area resize, nearest for masks); as is when ``size``
    is None or already right."""
    if size is None or image.shape == (size, size):
        return image
    interp = cv2.INTER_NEAREST if mask else cv2.INTER_AREA
    return cv2.resize(image, (size, size), interpolation=interp)


def read_gray(path: Path, size: int | None = None, mask: bool = False) -> np.ndarray:
    """Read a PNG as uint8 gray, resized to ``size`` x ``size`` when given."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(
            f"{path}: missing or unreadable PNG; restore it with `dvc checkout "
            f"{path.parent.parent}` or rerun `dvc repro -f -s convert`"
        )
    return resize_gray(image, size, mask)


def read_pair(
    processed_dir: str | Path, image_id: str, size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The PNG path: the processed image and its 0/1 mask at ``size`` (None: as stored)."""
    image = read_gray(image_path(processed_dir, image_id), size)
    mask = read_gray(mask_path(processed_dir, image_id), image.shape[0], mask=True) > 127
    return image, mask.astype(np.uint8)


def write_arrays(
    processed_dir: str | Path, out_dir: str | Path, sizes: list[int], progress: bool = True
) -> dict[str, Any]:
    """Decode every training image and mask of ``processed_dir`` once and write them at each
    of ``sizes`` and at the PNGs' own size; the folder is replaced as a whole (written beside
    it, then swapped in). Returns what ``arrays.json`` holds plus ``images`` and ``bytes``."""
    processed, out = Path(processed_dir), Path(out_dir)
    ids = [i for i, row in read_manifest(processed).items() if row["split"] == "train"]
    if not ids:
        raise ValueError(f"{processed / 'manifest.csv'}: no training images to write")
    native = read_gray(image_path(processed, ids[0])).shape[0]
    sizes = sorted({*sizes, native})
    total = 0
    with staged_dir(out) as work:  # a kill or a full disk leaves the previous arrays whole
        (work / IDS).write_text("".join(f"{i}\n" for i in ids))
        stores = {}
        for size in sizes:
            (work / str(size)).mkdir()
            shape = (len(ids), size, size)
            stores[size] = tuple(  # the space claimed now: a full disk is one line, no SIGBUS
                new_memmap(work / str(size) / f"{kind}.npy", shape) for kind in ("images", "masks")
            )
        for row, image_id in enumerate(progress_bar(ids, desc="arrays", bars_allowed=progress)):
            image, mask = read_pair(processed, image_id, None)
            for size, (images, masks) in stores.items():
                images[row], masks[row] = resize_gray(image, size), resize_gray(mask, size, True)
        for pair in stores.values():
            for array in pair:
                array.flush()
                total += array.nbytes
        del stores, pair, array
        info = {"processed_size": native, "sizes": sizes}
        (work / INFO).write_text(json.dumps(info) + "\n")
    return {**info, "images": len(ids), "bytes": total}


def save_rows(
    folder: Path, ids: list[str], images: np.ndarray, masks: np.ndarray, chunk: int = 256
) -> None:
    """Write (N, S, S) uint8 ``images`` and 0/1 ``masks`` of ``ids`` into ``folder`` in the
    layout above, at their one size S (what :class:`ArrayRows` reads; e.g. pseudo-labels).
    They may be memory maps larger than memory: ``chunk`` rows are copied at a time."""
    side = int(images.shape[-1]) if len(ids) else 0
    (folder / str(side)).mkdir(parents=True, exist_ok=True)
    (folder / IDS).write_text("".join(f"{i}\n" for i in ids))
    for name, rows in (("images.npy", images), ("masks.npy", masks)):
        path = folder / str(side) / name
        if not len(ids):
            np.save(path, np.asarray(rows, dtype=np.uint8))
            continue
        target = new_memmap(path, (len(ids), side, side))
        for start in range(0, len(ids), chunk):
            target[start : start + chunk] = rows[start : start + chunk]
        target.flush()
        del target
    (folder / INFO).write_text(json.dumps({"processed_size": side, "sizes": [side]}) + "\n")


@dataclass(frozen=True)
class _RowFile:
    """One ``.npy`` file of (N, S, S) uint8 rows: where its data starts and how long a row is."""

    path: Path
    offset: int
    side: int

    @classmethod
    def open(cls, path: Path, n_rows: int) -> _RowFile:
        with path.open("rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if major == 1
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
        if dtype != np.uint8 or fortran or len(shape) != 3 or shape[0] != n_rows:
            raise ValueError(
                f"{path}: expected ({n_rows}, S, S) uint8 rows, found {shape} {dtype}; "
                "rerun `dvc repro arrays`"
            )
        expected = offset + n_rows * shape[1] * shape[2]
        if path.stat().st_size != expected:
            raise ValueError(
                f"{path}: {path.stat().st_size} bytes where its header promises {expected} "
                "(a torn write); rerun `dvc repro arrays` or `dvc checkout`"
            )
        return cls(path, offset, int(shape[1]))


class ArrayRows:
    """Rows of the arrays at one size, by ImageId. A size without its own array is resized per
    row from the PNGs' own size, like the PNG path (add it to ``arrays.sizes`` to save that)."""

    def __init__(self, out_dir: str | Path, size: int) -> None:
        self._fds: tuple[int, int] | None = None  # opened on first read, in each process
        self._pid = -1
        root = Path(out_dir)
        ids_file = root / IDS
        if not ids_file.is_file():
            raise FileNotFoundError(
                f"{ids_file}: not found; run `dvc repro arrays` (or `pneumoseg arrays`)"
            )
        ids = ids_file.read_text().split()
        self.row = {image_id: i for i, image_id in enumerate(ids)}
        self.size = size
        info = json.loads((root / INFO).read_text())
        source = size if size in info["sizes"] else info["processed_size"]
        self.files = tuple(
            _RowFile.open(root / str(source) / f"{kind}.npy", len(ids))
            for kind in ("images", "masks")
        )

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own files
        return {**self.__dict__, "_fds": None, "_pid": -1}

    def _read(self, file: _RowFile, fd: int, row: int) -> np.ndarray:
        """Row ``row`` of ``file`` into a fresh array (one read, no extra copy)."""
        out = np.empty((file.side, file.side), np.uint8)
        n = os.preadv(fd, [out], file.offset + row * out.nbytes)
        if n != out.nbytes:
            raise ValueError(f"{file.path}: row {row} is truncated; rerun `dvc repro arrays`")
        return out

    def pair(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 image and 0/1 mask of ``image_id`` at ``size`` (fresh, writable arrays)."""
        if self._fds is None or self._pid != os.getpid():
            self._fds = tuple(os.open(f.path, os.O_RDONLY) for f in self.files)  # type: ignore[assignment]
            self._pid = os.getpid()
        try:
            row = self.row[image_id]
        except KeyError:
            raise KeyError(
                f"{self.files[0].path}: no row for ImageId {image_id}; rerun `dvc repro arrays`"
            ) from None
        image, mask = (self._read(f, fd, row) for f, fd in zip(self.files, self._fds, strict=True))
        return resize_gray(image, self.size), resize_gray(mask, self.size, mask=True)

    def __del__(self) -> None:
        if self._fds is not None and self._pid == os.getpid():
            for fd in self._fds:
                os.close(fd)
