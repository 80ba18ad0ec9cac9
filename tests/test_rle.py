"""RLE codec: both dialects, hand-computed examples, csv reading, unions, errors, auto-detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumoseg.rle import (
    RLEError,
    decode_union,
    detect_dialect,
    read_rle_csv,
    rle_decode,
    rle_encode,
)

# A 4 (rows) x 3 (cols) mask whose first run wraps from column 0 into column 1: pixel order is
# column-major (p = col * H + row), so the foreground pixels are p = 1, 2, 3, 4 and 11.
SMALL = np.array(
    [
        [0, 1, 0],
        [1, 0, 0],
        [1, 0, 0],
        [1, 0, 1],
    ],
    dtype=np.uint8,
)
SMALL_ABSOLUTE = "2 4 12 1"  # 1-based starts
SMALL_RELATIVE = "1 4 6 1"  # gap from 0, then gap since the end of the previous run (5 -> 11)

# Two runs per column pair: p = 1,2 and 4,5 and 11.
SMALL2 = np.array(
    [
        [0, 1, 0],
        [1, 1, 0],
        [1, 0, 0],
        [0, 0, 1],
    ],
    dtype=np.uint8,
)
SMALL2_ABSOLUTE = "2 2 5 2 12 1"
SMALL2_RELATIVE = "1 2 1 2 5 1"

# SIIM stage-1 style strings for a 1024 x 1024 film, written for these tests: a lesion starting
# at column 120, row 576 and spanning seven columns (1024 - previous length between runs).
LESION = "123456 5 1019 8 1016 10 1014 11 1013 11 1014 9 1017 5"
# A thin apical pneumothorax along many columns, one run per column, drifting upwards.
APICAL = "742500 3 " + " ".join(f"{1024 - 3 - 1} 3" for _ in range(40))
# Bottom-right corner: three runs in column 1020 (from row 990), then rows 990-1023 of columns
# 1021-1023, ending exactly at the last pixel of the image.
CORNER = "1045470 4 2 6 3 10 999 34 990 34 990 34"


def reference_decode(rle: str, height: int, width: int, dialect: str) -> np.ndarray:
    """Slow, obviously-correct decoder: walk the pairs one pixel at a time."""
    flat = np.zeros(height * width, dtype=np.uint8)
    values = [int(v) for v in rle.split()] if rle.strip() not in ("", "-1") else []
    position = 0
    for first, length in zip(values[0::2], values[1::2], strict=True):
        start = position + first if dialect == "relative" else first - 1
        for p in range(start, start + length):
            flat[p] = 1
        position = start + length
    return flat.reshape(width, height).T


def reference_encode(mask: np.ndarray, dialect: str) -> str:
    """Slow, obviously-correct encoder over the column-major pixel sequence."""
    height, width = mask.shape
    out: list[int] = []
    previous_end = 0
    p = 0
    total = height * width
    while p < total:
        if mask[p % height, p // height]:
            start = p
            while p < total and mask[p % height, p // height]:
                p += 1
            out += [start - previous_end if dialect == "relative" else start + 1, p - start]
            previous_end = p
        else:
            p += 1
    return " ".join(map(str, out)) if out else "-1"


def relative_to_absolute(rle: str) -> str:
    """Convert a relative string pair by pair (1-based start = previous end + gap + 1)."""
    values = [int(v) for v in rle.split()]
    out, end = [], 0
    for gap, length in zip(values[0::2], values[1::2], strict=True):
        out += [end + gap + 1, length]
        end += gap + length
    return " ".join(map(str, out))


def write_csv(
    path: Path, rows: list[tuple[str, str]], header: str = "ImageId, EncodedPixels"
) -> Path:
    lines = [header] + [f"{image_id}, {rle}" for image_id, rle in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- hand-computed examples ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask, dialect, expected",
    [
        (SMALL, "absolute", SMALL_ABSOLUTE),
        (SMALL, "relative", SMALL_RELATIVE),
        (SMALL2, "absolute", SMALL2_ABSOLUTE),
        (SMALL2, "relative", SMALL2_RELATIVE),
    ],
)
def test_hand_computed_small_masks(mask: np.ndarray, dialect: str, expected: str) -> None:
    assert rle_encode(mask, dialect) == expected
    decoded = rle_decode(expected, 4, 3, dialect)
    assert decoded.shape == (4, 3)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask)


def test_pixel_order_is_column_major() -> None:
    # a single pixel at p = 5 of a 4 x 3 image is row 1 of column 1 (row-major would be row 1,
    # column 2)
    mask = rle_decode("6 1", 4, 3, "absolute")
    assert np.argwhere(mask).tolist() == [[1, 1]]
    # a run of 3 from p = 2 wraps from the bottom of column 0 into the top of column 1
    mask = rle_decode("2 3", 4, 3, "relative")
    assert np.argwhere(mask).tolist() == [[0, 1], [2, 0], [3, 0]]


def test_nonzero_values_are_foreground() -> None:
    assert rle_encode(SMALL * 255, "relative") == SMALL_RELATIVE
    assert rle_encode(SMALL.astype(bool), "absolute") == SMALL_ABSOLUTE


def test_run_ending_at_last_pixel_is_valid() -> None:
    mask = rle_decode("12 4", 4, 4, "relative")
    assert mask[:, 3].tolist() == [1, 1, 1, 1] and mask.sum() == 4
    assert rle_encode(mask, "absolute") == "13 4"


# --- realistic strings -------------------------------------------------------------------------


@pytest.mark.parametrize("rle", [LESION, APICAL, CORNER])
def test_siim_relative_strings_round_trip_exactly(rle: str) -> None:
    mask = rle_decode(rle, 1024, 1024, "relative")
    values = [int(v) for v in rle.split()]
    assert mask.sum() == sum(values[1::2])
    np.testing.assert_array_equal(mask, reference_decode(rle, 1024, 1024, "relative"))
    assert rle_encode(mask, "relative") == rle
    absolute = rle_encode(mask, "absolute")
    assert absolute == relative_to_absolute(rle)
    assert rle_encode(rle_decode(absolute, 1024, 1024, "absolute"), "absolute") == absolute
    np.testing.assert_array_equal(rle_decode(absolute, 1024, 1024, "absolute"), mask)


def test_lesion_lands_where_hand_computation_says() -> None:
    mask = rle_decode(LESION, 1024, 1024, "relative")
    # p = 123456 = 120 * 1024 + 576: column 120, row 576, five pixels down
    assert mask[576:581, 120].tolist() == [1] * 5
    assert mask[575, 120] == 0 and mask[581, 120] == 0
    # second run starts 1019 after the end of the first (123461): p = 124480 = col 121, row 576
    assert mask[576:584, 121].all() and mask[584, 121] == 0
    cols = np.flatnonzero(mask.any(axis=0))
    assert cols.tolist() == list(range(120, 127))


def test_corner_lesion_reaches_last_pixel() -> None:
    mask = rle_decode(CORNER, 1024, 1024, "relative")
    assert mask[1023, 1023] == 1
    with pytest.raises(RLEError):
        rle_decode(CORNER + " 0 1", 1024, 1024, "relative")


def test_hand_made_masks_round_trip_both_dialects() -> None:
    h, w = 64, 48
    yy, xx = np.mgrid[0:h, 0:w]
    masks = [
        ((yy - 20) ** 2 / 100 + (xx - 30) ** 2 / 36 < 1),  # ellipse
        (xx >= 47),  # last column only
        (yy == 0),  # first row: one pixel per column
        np.ones((h, w), bool),  # everything: one run
        ((yy + xx) % 7 == 0),  # diagonals: many short runs
    ]
    for mask in masks:
        for dialect in ("relative", "absolute"):
            rle = rle_encode(mask, dialect)
            assert rle == reference_encode(mask, dialect)
            np.testing.assert_array_equal(rle_decode(rle, h, w, dialect), mask.astype(np.uint8))
            assert rle_encode(rle_decode(rle, h, w, dialect), dialect) == rle


def test_large_random_mask_with_thousands_of_runs() -> None:
    rng = np.random.default_rng(0)
    # blocky random mask: runs of varied length in every column
    mask = rng.random((1024, 1024)) < 0.3
    mask |= np.roll(mask, 1, axis=0)
    for dialect in ("relative", "absolute"):
        rle = rle_encode(mask, dialect)
        n_runs = len(rle.split()) // 2
        assert n_runs > 100_000
        decoded = rle_decode(rle, 1024, 1024, dialect)
        np.testing.assert_array_equal(decoded, mask.astype(np.uint8))
        assert rle_encode(decoded, dialect) == rle
    # cross-check the fast decoder against the slow one on a few thousand runs
    sub = mask[:, :40]
    rle = rle_encode(sub, "relative")
    assert len(rle.split()) // 2 > 3000
    np.testing.assert_array_equal(
        rle_decode(rle, 1024, 40, "relative"), reference_decode(rle, 1024, 40, "relative")
    )


# --- empty masks --------------------------------------------------------------------------------


@pytest.mark.parametrize("empty", ["-1", " -1", "-1 ", "", "   "])
@pytest.mark.parametrize("dialect", ["relative", "absolute"])
def test_empty_strings_decode_to_empty_masks(empty: str, dialect: str) -> None:
    mask = rle_decode(empty, 5, 7, dialect)
    assert mask.shape == (5, 7) and not mask.any()


@pytest.mark.parametrize("dialect", ["relative", "absolute"])
def test_empty_mask_encodes_to_minus_one(dialect: str) -> None:
    assert rle_encode(np.zeros((8, 8), np.uint8), dialect) == "-1"


def test_unknown_dialect_is_rejected() -> None:
    with pytest.raises(ValueError, match="dialect"):
        rle_decode("1 2", 4, 4, "row-major")
    with pytest.raises(ValueError, match="dialect"):
        rle_encode(SMALL, "auto")


# --- malformed strings --------------------------------------------------------------------------

MALFORMED = [
    ("1 2 3", "relative", "odd"),
    ("4 -2", "relative", "negative"),
    ("-3 2", "absolute", "negative"),
    ("4 0", "relative", "zero-length"),
    ("2 2 5 0", "absolute", "zero-length"),
    ("10 7", "relative", "past the end"),  # 16 pixels in 4 x 4
    ("10 3 3 3", "relative", "past the end"),  # second run starts at 16
    ("15 3", "absolute", "past the end"),
    ("0 3", "absolute", "1-based"),
    ("1 x", "relative", "integer"),
    ("1.5 2", "relative", "integer"),
    ("99999999999999999999 2", "relative", "out-of-range"),  # beyond int64
    ("9223372036854775807 1", "relative", "past the end"),  # start + length overflows int64
    ("1 9223372036854775807", "absolute", "past the end"),
    ("4 2 " * 3 + "9223372036854775000 1", "relative", "past the end"),
]


@pytest.mark.parametrize("rle, dialect, words", MALFORMED)
def test_malformed_strings_raise_value_error(rle: str, dialect: str, words: str) -> None:
    with pytest.raises(RLEError, match=words) as info:
        rle_decode(rle, 4, 4, dialect)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("rle, dialect, words", MALFORMED)
def test_malformed_rows_in_csv_name_image_and_line(
    tmp_path: Path, rle: str, dialect: str, words: str
) -> None:
    path = write_csv(
        tmp_path / "train-rle.csv",
        [("img.good", "1 2"), ("img.bad", "-1"), ("img.other", "3 1"), ("img.bad", rle)],
    )
    table = read_rle_csv(path, dialect)
    assert table.decode("img.good", 4, 4).sum() == 2
    with pytest.raises(ValueError, match=words) as info:
        table.decode("img.bad", 4, 4)
    message = str(info.value)
    assert "img.bad" in message
    assert "line 5" in message  # header is line 1, the bad row the 4th data row
    assert "train-rle.csv" in message
    assert "\n" not in message


def test_csv_without_expected_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("Id,Pixels\na,1 2\n")
    with pytest.raises(RLEError, match="line 1"):
        read_rle_csv(path)


def test_csv_row_with_extra_column_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("ImageId,EncodedPixels\na,1 2\nb,1 2,3\n")
    with pytest.raises(ValueError, match="line 3"):
        read_rle_csv(path)


# --- csv reading and unions ---------------------------------------------------------------------


@pytest.mark.parametrize("header", ["ImageId, EncodedPixels", "ImageId,EncodedPixels"])
def test_both_header_variants(tmp_path: Path, header: str) -> None:
    path = write_csv(tmp_path / "t.csv", [("a", SMALL_RELATIVE), ("b", "-1")], header=header)
    table = read_rle_csv(path, "relative")
    assert sorted(table.ids()) == ["a", "b"] and len(table) == 2 and "a" in table
    np.testing.assert_array_equal(table.decode("a", 4, 3), SMALL)
    assert not table.decode("b", 4, 3).any()


def test_several_rows_are_the_union_even_when_overlapping(tmp_path: Path) -> None:
    h, w = 32, 24
    a = np.zeros((h, w), np.uint8)
    b = np.zeros((h, w), np.uint8)
    a[5:15, 3:10] = 1
    b[10:20, 8:14] = 1  # overlaps a
    c = np.zeros((h, w), np.uint8)
    c[28:30, 20:22] = 1  # disjoint
    rows = [(img, rle_encode(m, "relative")) for img, m in [("x", a), ("y", c), ("x", b)]]
    rows.append(("x", "-1"))  # an empty row adds nothing
    rows.append(("x", rle_encode(c, "relative")))
    table = read_rle_csv(write_csv(tmp_path / "u.csv", rows), "relative")
    union = table.decode("x", h, w)
    expected = (a | b | c).astype(np.uint8)
    np.testing.assert_array_equal(union, expected)
    assert union.sum() < a.sum() + b.sum() + c.sum()  # the overlap is counted once
    assert union.max() == 1
    np.testing.assert_array_equal(
        decode_union([rle_encode(a, "absolute"), rle_encode(b, "absolute")], h, w, "absolute"),
        (a | b).astype(np.uint8),
    )


# --- dialect detection --------------------------------------------------------------------------


def _lesion_masks(n: int, h: int = 96, w: int = 80) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    masks = []
    for i in range(n):
        cy, cx, ry, rx = 20 + 5 * i, 15 + 6 * i, 8 + i, 5 + i
        masks.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1).astype(np.uint8))
    return masks


@pytest.mark.parametrize("dialect", ["relative", "absolute"])
def test_auto_detects_the_dialect_of_a_file(tmp_path: Path, dialect: str) -> None:
    masks = _lesion_masks(6)
    rows = [(f"img{i}", rle_encode(m, dialect)) for i, m in enumerate(masks)]
    rows.insert(2, ("neg", "-1"))
    table = read_rle_csv(write_csv(tmp_path / "f.csv", rows), "auto")
    assert table.dialect == dialect
    for i, mask in enumerate(masks):
        np.testing.assert_array_equal(table.decode(f"img{i}", 96, 80), mask)


def test_auto_decides_over_the_whole_file() -> None:
    # alone, this relative string is also a valid sorted absolute string: no verdict ...
    ambiguous = "1 2 5 2 10 2"
    assert detect_dialect([ambiguous]) is None
    # ... but one string out of order as absolute makes the whole file relative
    assert detect_dialect([ambiguous, LESION, "-1"]) == "relative"
    assert detect_dialect(["7 3 2 2", "-1"]) == "relative"  # two runs out of order
    # without any run, the dialect changes nothing: relative
    assert detect_dialect(["-1", "", " -1 "]) == "relative"
    # single runs differ by one pixel between the dialects: no verdict
    assert detect_dialect(["5 3", "-1", "900 12"]) is None
    absolute = [rle_encode(m, "absolute") for m in _lesion_masks(3)]
    assert detect_dialect([*absolute, "7 2", "-1"]) == "absolute"
    assert detect_dialect(absolute[:2]) is None  # two long sorted strings are not enough


def test_auto_names_a_file_it_cannot_tell(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "few.csv", [("a", "5 3"), ("b", "-1"), ("c", "1 2 5 2 10 2")])
    with pytest.raises(RLEError, match=r"^few.csv: cannot tell its RLE dialect .*data.rle_dialect"):
        read_rle_csv(path, "auto")
    assert read_rle_csv(path, "relative").dialect == "relative"  # a set dialect is taken as is


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("5 3 6 2", r"run 2 starts at pixel 6, before run 1 ends \(pixel 7\)"),  # overlap
        ("20 2 5 2", r"run 2 starts at pixel 5, before run 1 ends \(pixel 21\)"),  # unsorted
    ],
)
def test_absolute_rle_refuses_overlapping_or_unsorted_runs(rle: str, message: str) -> None:
    with pytest.raises(RLEError, match=message):
        rle_decode(rle, 10, 10, "absolute")
    rle_decode("5 3 8 2", 10, 10, "absolute")  # touching runs are sorted and disjoint
