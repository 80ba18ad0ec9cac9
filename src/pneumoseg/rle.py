"""SIIM run-length encoding: the relative (stage 1) and absolute (Kaggle standard) dialects.

Pixels are counted column by column (``p = col * H + row``, i.e. ``mask.T.ravel()``).

* ``relative``: pairs (gap since the end of the previous run, length); the first gap is the
  0-based start of the first run.
* ``absolute``: pairs (1-based start, length).

``"-1"`` (or an empty string) is an empty mask. Only numpy is imported here.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np

DIALECTS = ("relative", "absolute")
EMPTY = "-1"


class RLEError(ValueError):
    """A malformed RLE string or csv; the message names the ImageId and csv line when known."""


def _check_dialect(dialect: str) -> None:
    if dialect not in DIALECTS:
        raise ValueError(f"unknown RLE dialect {dialect!r}; expected one of {DIALECTS}")


def _parse(rle: str, where: str) -> np.ndarray:
    text = rle.strip()
    if text in ("", EMPTY):
        return np.empty((0, 2), dtype=np.int64)
    try:
        values = np.array(text.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        raise RLEError(f"{where}non-integer or out-of-range value in RLE string") from None
    if values.size % 2:
        raise RLEError(f"{where}odd number of values ({values.size})")
    if (values < 0).any():
        raise RLEError(f"{where}negative value in RLE string")
    return values.reshape(-1, 2)


def runs_from_rle(
    rle: str, height: int, width: int, dialect: str = "relative", where: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Return 0-based ``(starts, lengths)`` of the runs in column-major pixel order."""
    _check_dialect(dialect)
    pairs = _parse(rle, where)
    if pairs.size == 0:
        return pairs[:, 0], pairs[:, 1]
    first, lengths = pairs[:, 0], pairs[:, 1]
    if (lengths == 0).any():
        raise RLEError(f"{where}zero-length run")
    if (pairs > height * width).any():  # also keeps the sums below from overflowing
        raise RLEError(f"{where}run past the end of a {height}x{width} image")
    if dialect == "relative":
        # start_i = sum(gaps[:i+1]) + sum(lengths[:i])
        starts = np.cumsum(first) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    else:
        if (first == 0).any():
            raise RLEError(f"{where}absolute RLE start 0 (starts are 1-based)")
        starts = first - 1
        ends = starts + lengths
        bad = np.flatnonzero(starts[1:] < ends[:-1])
        if bad.size:  # Kaggle's absolute RLE: sorted, non-overlapping runs
            i = int(bad[0]) + 1
            raise RLEError(
                f"{where}absolute RLE run {i + 1} starts at pixel {int(first[i])}, before run "
                f"{i} ends (pixel {int(ends[i - 1])}): runs must be sorted and must not overlap"
            )
    if (starts + lengths > height * width).any():
        raise RLEError(f"{where}run past the end of a {height}x{width} image")
    return starts, lengths


def rle_decode(rle: str, height: int, width: int, dialect: str = "relative") -> np.ndarray:
    """Decode an RLE string to a uint8 0/1 mask of shape (height, width)."""
    return decode_union([rle], height, width, dialect)


def decode_union(
    rles: Iterable[str],
    height: int,
    width: int,
    dialect: str = "relative",
    where: Iterable[str] | None = None,
) -> np.ndarray:
    """Decode several RLE strings of one image into the union of their masks."""
    flat = np.zeros(height * width, dtype=np.uint8)
    wheres = list(where) if where is not None else None
    for i, rle in enumerate(rles):
        starts, lengths = runs_from_rle(rle, height, width, dialect, wheres[i] if wheres else "")
        if starts.size:
            # every covered pixel index at once: O(foreground), not O(image) per string
            offsets = np.cumsum(lengths) - lengths
            flat[np.repeat(starts - offsets, lengths) + np.arange(offsets[-1] + lengths[-1])] = 1
    return flat.reshape(width, height).T.copy()


def rle_encode(mask: np.ndarray, dialect: str = "relative") -> str:
    """Encode a 2-D mask (nonzero = foreground) as an RLE string; empty mask -> ``"-1"``."""
    _check_dialect(dialect)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask, got shape {mask.shape}")
    flat = np.concatenate(([0], (np.asarray(mask).T.ravel() != 0).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(flat))
    if edges.size == 0:
        return EMPTY
    starts, ends = edges[0::2], edges[1::2]
    lengths = ends - starts
    firsts = starts - np.concatenate(([0], ends[:-1])) if dialect == "relative" else starts + 1
    pairs = np.stack([firsts, lengths], axis=1).ravel()
    return " ".join(map(str, pairs.tolist()))


def _looks_absolute(rle: str) -> bool | None:
    """False for a string whose runs are out of order or overlap read as absolute RLE (it
    cannot be absolute); True for one with >= :data:`TELLING_RUNS` sorted, disjoint runs (a
    relative string rarely is); None when the string says nothing either way."""
    try:
        pairs = _parse(rle, "")
    except RLEError:
        return None
    if len(pairs) < 2:
        return None
    starts, lengths = pairs[:, 0], pairs[:, 1]
    if not (starts[1:] >= starts[:-1] + lengths[:-1]).all():
        return False
    return True if len(pairs) >= TELLING_RUNS else None


TELLING_RUNS = 3  # runs a sorted string needs to count as evidence of the absolute dialect
TELLING_STRINGS = 3  # such strings a file needs (and none against) to be called absolute


def detect_dialect(rles: Iterable[str]) -> str | None:
    """The dialect of a whole file, or None when it cannot be told. ``relative`` when any
    string's runs are out of order read as absolute (absolute RLE must be sorted), or when no
    string has a run (the dialect then changes nothing); ``absolute`` when at least
    :data:`TELLING_STRINGS` strings of :data:`TELLING_RUNS` or more runs are all sorted and
    disjoint; otherwise None (too few long strings: a short relative string is often also a
    valid absolute one, and a single run differs by one pixel between the dialects)."""
    votes, foreground = [], False
    for rle in rles:
        foreground = foreground or rle.strip() not in ("", EMPTY)
        vote = _looks_absolute(rle)
        if vote is False:
            return "relative"
        if vote:
            votes.append(vote)
    if not foreground:
        return "relative"
    return "absolute" if len(votes) >= TELLING_STRINGS else None


class RLETable:
    """Rows of an RLE csv grouped by ImageId, keeping csv line numbers for error messages."""

    def __init__(self, source: str, dialect: str) -> None:
        self.source = source
        self.dialect = dialect
        self.rows: dict[str, list[tuple[int, str]]] = {}

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self) -> list[str]:
        return list(self.rows)

    def decode(self, image_id: str, height: int, width: int) -> np.ndarray:
        """Union mask of all rows of ``image_id`` at (height, width)."""
        return decode_rows(self.rows[image_id], height, width, self.dialect, self.source, image_id)


def decode_rows(
    rows: Iterable[tuple[int, str]],
    height: int,
    width: int,
    dialect: str,
    source: str,
    image_id: str,
) -> np.ndarray:
    """Union mask of csv rows ``(line_no, rle)`` of one image; errors name file, line, ImageId."""
    rows = list(rows)
    where = [f"{source} line {ln} (ImageId {image_id}): " for ln, _ in rows]
    return decode_union([r for _, r in rows], height, width, dialect, where)


def read_rle_csv(path: str | Path, dialect: str = "relative") -> RLETable:
    """Read ``ImageId, EncodedPixels`` (leading space optional) into an :class:`RLETable`.

    ``dialect`` is ``relative``, ``absolute`` or ``auto`` (decided over the whole file by
    :func:`detect_dialect`; a file it cannot tell is an error naming the way out). A UTF-8
    byte-order mark and CRLF line ends (a csv saved by Excel) are accepted; repeated rows of one
    ImageId are unioned (the SIIM format: one row per lesion).
    """
    path = Path(path)
    try:
        return _read_rle_csv(path, dialect)
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text (byte {exc.start}); save it as UTF-8"
        raise RLEError(f"{path.name}: {reason}") from None


def _read_rle_csv(path: Path, dialect: str) -> RLETable:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "EncodedPixels"]:
            raise RLEError(
                f"{path.name} line 1: expected header 'ImageId, EncodedPixels', got {header!r}"
            )
        table = RLETable(path.name, dialect)
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2:
                raise RLEError(f"{path.name} line {line_no}: expected 2 columns, got {len(row)}")
            image_id, rle = row[0].strip(), row[1].strip()
            if not image_id:
                raise RLEError(f"{path.name} line {line_no}: empty ImageId")
            table.rows.setdefault(image_id, []).append((line_no, rle))
    if dialect == "auto":
        detected = detect_dialect(r for rows in table.rows.values() for _, r in rows)
        if detected is None:
            raise RLEError(
                f"{path.name}: cannot tell its RLE dialect (fewer than {TELLING_STRINGS} strings "
                f"of {TELLING_RUNS}+ runs, all also valid absolute RLE); set data.rle_dialect "
                "(or --dialect) to relative or absolute"
            )
        table.dialect = detected
    else:
        _check_dialect(dialect)
    return table
