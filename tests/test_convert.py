"""DICOM conversion: pixel formats, masks, bad inputs, parallelism, de-identification, layouts."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from conftest import (
    IDENTIFYING,
    LEFT_LUNG_COLS,
    LUNG_ROWS,
    MARKER,
    MEDIASTINUM_COLS,
    radiograph,
    region,
    write_dicom,
)

from pneumoseg import cli
from pneumoseg.conversion import MANIFEST_FIELDS, ConvertSummary, convert
from pneumoseg.dicom import DicomReadError, read_dicom
from pneumoseg.rle import rle_encode

SIZE = 64  # processed side
UID_ROOT = "1.2.826.0.1.3680043.10.999"  # root of every identifying UID (see conftest)
SECRETS = [
    "SECRET",  # PatientName, PatientID, InstitutionName, AccessionNumber, physician, ...
    "HOSPITAL",
    "Hiddentown",
    "1945",  # birth date
    "19450101",
    "20170823",  # study date
    "2017",  # every date of the fake studies
    "134501",  # study time
    UID_ROOT,  # study, series and frame-of-reference UIDs (and the folders named after them)
]


def image_id(n: int) -> str:
    """A SIIM-like SOP Instance UID (a different root from the identifying UIDs)."""
    return f"1.2.276.0.7230010.3.1.4.8323329.{4000 + n}.1517875{180 + n}.{700000 + n}"


def ellipse(shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float]):
    """A 0/1 ellipse mask; center and radii as fractions of (rows, cols)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, ry, rx = center[0] * h, center[1] * w, radii[0] * h, radii[1] * w
    return ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1).astype(np.uint8)


@dataclass
class Case:
    """One good DICOM of the test tree and what its conversion must give."""

    name: str
    n: int
    shape: tuple[int, int]  # native rows, columns
    dicom: dict[str, Any]  # write_dicom keyword arguments
    masks: list[np.ndarray] | None = None  # csv rows (None: a test image)
    extra_rows: list[str] = field(default_factory=list)  # further raw csv strings

    @property
    def image_id(self) -> str:
        return image_id(self.n)

    @property
    def picture(self) -> np.ndarray:
        h, w = self.shape
        return radiograph(max(h, w), seed=self.n)[:h, :w]

    @property
    def union(self) -> np.ndarray | None:
        if self.masks is None:
            return None
        out = np.zeros(self.shape, np.uint8)
        for mask in self.masks:
            out |= mask
        return out


SQUARE = (128, 128)
WIDE = (120, 160)  # Rows x Columns differ: a swapped decode cannot pass
RIGHT_LUNG = ((0.45, 0.78), (0.12, 0.06))

CASES = [
    Case(
        "jpeg8",
        1,
        SQUARE,
        {"transfer_syntax": "jpeg_baseline"},
        masks=[ellipse(SQUARE, *RIGHT_LUNG)],
    ),
    Case(
        "rle16",
        2,
        SQUARE,
        {"transfer_syntax": "rle", "bits": 16},
        masks=[  # two overlapping regions, one csv row each
            ellipse(SQUARE, (0.40, 0.30), (0.15, 0.08)),
            ellipse(SQUARE, (0.52, 0.34), (0.12, 0.10)),
        ],
    ),
    Case(
        "mono1_window12",
        3,
        WIDE,
        {"photometric": "MONOCHROME1", "bits": 12, "window": (2000.0, 3600.0)},
        masks=[ellipse(WIDE, (0.30, 0.80), (0.10, 0.05))],
    ),
    Case(
        "mono1_j2k15",
        4,
        SQUARE,
        {"photometric": "MONOCHROME1", "bits": 15, "transfer_syntax": "j2k"},
        masks=[],  # "-1": a negative training image
    ),
    Case("mono2_16", 5, SQUARE, {"bits": 16}, masks=[]),
    Case("plain8_test", 6, SQUARE, {}, masks=None),  # not in the csv: test image
]
GOOD = {c.name: c for c in CASES}

# Bad inputs: ImageId number -> expected words of the failure reason.
TRUNCATED, TEXT, NO_PIXELS, NO_DICOM, BAD_RLE, BAD_HEADER = 20, 21, 22, 23, 24, 25
BAD_REASONS = {
    TRUNCATED: "pixel data",
    BAD_HEADER: "header",
    TEXT: "not a DICOM",
    NO_PIXELS: "no pixel data",
    NO_DICOM: "no DICOM",
    BAD_RLE: "odd number",
}


def dicom_path(raw: Path, n: int, split: str = "train") -> Path:
    """SIIM layout: <split dir>/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm."""
    study, series = f"{UID_ROOT}.1.{n}", f"{UID_ROOT}.2.{n}"
    return raw / f"dicom-images-{split}" / study / series / f"{image_id(n)}.dcm"


def dicom_kwargs(n: int, **kw: Any) -> dict[str, Any]:
    extra = {"StudyInstanceUID": f"{UID_ROOT}.1.{n}", "SeriesInstanceUID": f"{UID_ROOT}.2.{n}"}
    return {"extra": extra, **kw}


def corrupt_modality_vr(path: Path) -> None:
    """Overwrite the VR of (0008,0060) Modality with garbage: dcmread succeeds (elements are
    parsed lazily) and the error surfaces only when the value is read."""
    data = path.read_bytes()
    tag = b"\x08\x00\x60\x00CS"
    assert data.count(tag) == 1
    path.write_bytes(data.replace(tag, b"\x08\x00\x60\x00\x43\xd1"))


def build_siim_tree(raw: Path) -> None:
    """dicom-images-train/, dicom-images-test/ and train-rle.csv with good and bad inputs."""
    rows: list[tuple[str, str]] = []
    for case in CASES:
        split = "test" if case.masks is None else "train"
        write_dicom(
            dicom_path(raw, case.n, split), case.picture, **dicom_kwargs(case.n, **case.dicom)
        )
        if case.masks is not None:
            rows += [(case.image_id, rle_encode(m, "relative")) for m in case.masks] or [
                (case.image_id, "-1")
            ]
    picture = radiograph(96, seed=TRUNCATED)
    good = write_dicom(dicom_path(raw, TRUNCATED), picture, **dicom_kwargs(TRUNCATED))
    good.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    text = dicom_path(raw, TEXT, "test")
    text.parent.mkdir(parents=True)
    text.write_text("this is not a DICOM file, only its name ends in .dcm\n")
    write_dicom(dicom_path(raw, NO_PIXELS), picture, pixel_data=False, **dicom_kwargs(NO_PIXELS))
    write_dicom(dicom_path(raw, BAD_RLE), picture, **dicom_kwargs(BAD_RLE))
    corrupt_modality_vr(write_dicom(dicom_path(raw, BAD_HEADER, "test"), picture))
    rows += [
        (image_id(TRUNCATED), "-1"),
        (image_id(NO_PIXELS), "100 20"),
        (image_id(NO_DICOM), "100 20"),
        (image_id(BAD_RLE), "100 20 7"),
    ]
    lines = ["ImageId, EncodedPixels"] + [f"{i}, {r}" for i, r in rows]  # SIIM stage-1 header
    (raw / "train-rle.csv").write_text("\n".join(lines) + "\n")


@dataclass
class Converted:
    raw: Path
    out: Path
    summary: ConvertSummary
    manifest: dict[str, dict[str, str]]
    failures: list[dict[str, str]]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def run_convert(raw: Path, out: Path, **kw: Any) -> Converted:
    summary = convert(raw, out, size=kw.pop("size", SIZE), progress=False, **kw)
    manifest = {r["ImageId"]: r for r in read_csv(out / "manifest.csv")}
    return Converted(raw, out, summary, manifest, read_csv(out / "failures.csv"))


@pytest.fixture(scope="module")
def raw_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("siim") / "raw"
    build_siim_tree(raw)
    return raw


@pytest.fixture(scope="module")
def converted(raw_tree: Path) -> Converted:
    return run_convert(raw_tree, raw_tree.parent / "processed", workers=1)


def read_png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def reference(picture: np.ndarray) -> np.ndarray:
    """The 8-bit MONOCHROME2 rendering of a picture at the processed size."""
    return cv2.resize(picture, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def assert_upright(image: np.ndarray, shape: tuple[int, int] = (SIZE, SIZE)) -> None:
    """Not inverted, not flipped: bright top-left marker, mediastinum right of centre."""
    side = image.shape[0]
    marker = image[region(side, *MARKER)].mean()
    top_right = image[region(side, MARKER[0], (0.90, 0.98))].mean()
    bottom_left = image[region(side, (0.90, 0.98), MARKER[1])].mean()
    assert marker > 200, f"marker corner not bright ({marker:.0f}): inverted or flipped"
    assert marker > top_right + 80 and marker > bottom_left + 40, "marker not top-left"
    rows = (LUNG_ROWS[0] + 0.05, LUNG_ROWS[1] - 0.05)
    mediastinum = image[region(side, rows, MEDIASTINUM_COLS)].mean()
    mirrored = (1 - MEDIASTINUM_COLS[1], 1 - MEDIASTINUM_COLS[0])
    assert LEFT_LUNG_COLS[0] <= mirrored[0] and mirrored[1] <= LEFT_LUNG_COLS[1]
    mirror = image[region(side, rows, mirrored)].mean()
    assert mediastinum > mirror + 60, "mediastinum not on the right: flipped left-right"


# --- the stage-1 SIIM tree ----------------------------------------------------------------------


def test_summary_counts(converted: Converted) -> None:
    s = converted.summary
    assert (s.converted, s.train, s.test, s.positive, s.failed) == (6, 5, 1, 3, 6)
    assert s.failed_fraction == pytest.approx(6 / 12)
    line = s.line()
    assert "6 converted (5 train, 1 test, 3 with masks), 6 failed" in line
    assert "\n" not in line
    assert sorted(converted.manifest) == sorted(c.image_id for c in CASES)


def test_manifest_columns_and_values(converted: Converted) -> None:
    with (converted.out / "manifest.csv").open() as fh:
        header = fh.readline().strip().split(",")
    assert tuple(header) == MANIFEST_FIELDS
    for c in ("ImageId", "split", "has_mask", "mask_pixels", "height", "width"):
        assert c in header
    for c in ("sex", "age", "view_position"):
        assert c in header
    for case in CASES:
        row = converted.manifest[case.image_id]
        assert (int(row["height"]), int(row["width"])) == case.shape
        assert row["split"] == ("test" if case.masks is None else "train")
        assert (row["sex"], row["age"], row["view_position"]) == ("M", "38", "PA")
        assert row["photometric"] == case.dicom.get("photometric", "MONOCHROME2")
        assert int(row["bits_stored"]) == case.dicom.get("bits", 8)
    syntaxes = {GOOD[n].image_id: s for n, s in [("jpeg8", "JPEG Baseline"), ("rle16", "RLE")]}
    for iid, words in syntaxes.items():
        assert words in converted.manifest[iid]["transfer_syntax"]


@pytest.mark.parametrize("name", list(GOOD))
def test_image_matches_the_8bit_rendering_and_is_upright(converted: Converted, name: str) -> None:
    case = GOOD[name]
    image = read_png(converted.out / "images" / f"{case.image_id}.png")
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE)
    assert pearson(image, reference(case.picture)) > 0.9
    assert_upright(image)
    assert image.std() > 30  # uses the grey range, not a washed-out picture


@pytest.mark.parametrize("name", [c.name for c in CASES if c.masks is not None])
def test_masks_are_native_unions_resized_nearest(converted: Converted, name: str) -> None:
    case = GOOD[name]
    union = case.union
    assert union is not None
    row = converted.manifest[case.image_id]
    assert int(row["mask_pixels"]) == int(union.sum())  # native resolution
    assert row["has_mask"] == str(int(union.any()))
    mask = read_png(converted.out / "masks" / f"{case.image_id}.png")
    assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
    assert set(np.unique(mask).tolist()) <= {0, 255}
    expected = cv2.resize(union, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST) * 255
    np.testing.assert_array_equal(mask, expected)


def test_overlapping_rows_are_counted_once(converted: Converted) -> None:
    case = GOOD["rle16"]
    assert case.masks is not None
    separate = sum(int(m.sum()) for m in case.masks)
    pixels = int(converted.manifest[case.image_id]["mask_pixels"])
    assert 0 < pixels < separate


def test_test_images_have_no_mask(converted: Converted) -> None:
    case = GOOD["plain8_test"]
    row = converted.manifest[case.image_id]
    assert row["has_mask"] == "" and row["mask_pixels"] == ""
    assert not (converted.out / "masks" / f"{case.image_id}.png").exists()
    assert (converted.out / "images" / f"{case.image_id}.png").exists()


def test_bad_inputs_are_reported_and_skipped(converted: Converted) -> None:
    failures = converted.failures
    assert len(failures) == len(BAD_REASONS)
    for n, words in BAD_REASONS.items():
        iid = image_id(n)
        hits = [f for f in failures if iid in f["path"] or iid in f["reason"]]
        assert len(hits) == 1, f"{iid}: {failures}"
        assert words.lower() in hits[0]["reason"].lower(), hits[0]
        assert "\n" not in hits[0]["reason"]
        assert not (converted.out / "images" / f"{iid}.png").exists()
        assert not (converted.out / "masks" / f"{iid}.png").exists()
        assert iid not in converted.manifest
    bad_rle = next(f for f in failures if "odd number" in f["reason"])
    assert "line" in bad_rle["reason"] and "train-rle.csv" in bad_rle["reason"]
    no_dicom = next(f for f in failures if "no DICOM" in f["reason"])
    assert no_dicom["path"].startswith("train-rle.csv")


def test_two_workers_give_identical_bytes(converted: Converted) -> None:
    parallel = run_convert(converted.raw, converted.out.parent / "processed_w2", workers=2)
    assert parallel.summary.converted == converted.summary.converted
    one = sorted(p.relative_to(converted.out) for p in converted.out.rglob("*") if p.is_file())
    two = sorted(p.relative_to(parallel.out) for p in parallel.out.rglob("*") if p.is_file())
    assert one == two
    assert len([p for p in one if p.suffix == ".png"]) == 6 + 5  # images + every train mask
    for rel in one:
        assert (converted.out / rel).read_bytes() == (parallel.out / rel).read_bytes(), rel


def test_no_identifying_value_in_any_output(converted: Converted) -> None:
    files = [p for p in converted.out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".png", ".csv", ".json"}  # json: dataset.json
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS + list(IDENTIFYING.values()):
            assert secret.encode() not in data, f"{secret!r} found in {path.name}"


def test_pseudonymized_ids_reach_no_output_and_map_back(
    converted: Converted,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """data.pseudonymize_ids: every ImageId downstream (names, manifest, failures, order) is
    the keyed pseudonym; no file stem appears in any output or log; the id map, written only
    where asked, maps back; without a key, one line."""
    from pneumoseg.redact import pseudonym

    monkeypatch.delenv("PNEUMOSEG_ID_KEY", raising=False)
    with pytest.raises(ValueError, match="^data.pseudonymize_ids: set PNEUMOSEG_ID_KEY"):
        run_convert(converted.raw, tmp_path / "nokey", pseudonymize=True)
    key = "a-site-secret-kept-elsewhere"
    monkeypatch.setenv("PNEUMOSEG_ID_KEY", key)
    id_map = tmp_path / "outside" / "id_map.csv"
    with caplog.at_level(logging.INFO):
        masked = run_convert(converted.raw, tmp_path / "p", pseudonymize=True, id_map=id_map)
    stems = sorted(p.stem for p in converted.raw.rglob("*.dcm"))
    expected = {pseudonym(i, key.encode()): i for i in converted.manifest}
    assert set(masked.manifest) == set(expected)
    for alias, original in expected.items():  # the same pixels under the pseudonym
        same = read_png(masked.out / "images" / f"{alias}.png")
        assert np.array_equal(same, read_png(converted.out / "images" / f"{original}.png"))
    assert len(masked.failures) == len(converted.failures)
    written = [p for p in masked.out.rglob("*") if p.is_file()]
    for path in written:
        data = path.read_bytes() + path.name.encode()
        assert not [s for s in stems if s.encode() in data], path.name
    assert "skipped" in caplog.text and not [s for s in stems if s in caplog.text]
    pairs = {r["pseudonym"]: r["ImageId"] for r in read_csv(id_map)}
    assert {k: v for k, v in pairs.items() if k in expected} == expected


def test_clahe_changes_contrast_only(raw_tree: Path, converted: Converted) -> None:
    from pneumoseg.params import ClaheParams

    clahe = ClaheParams(enabled=True, clip_limit=4.0, tile_grid=4)
    result = run_convert(raw_tree, raw_tree.parent / "processed_clahe", clahe=clahe)
    case = GOOD["jpeg8"]
    plain = read_png(converted.out / "images" / f"{case.image_id}.png")
    equalised = read_png(result.out / "images" / f"{case.image_id}.png")
    assert equalised.shape == plain.shape
    assert np.abs(equalised.astype(int) - plain.astype(int)).mean() > 3
    assert pearson(equalised, plain) > 0.8


# --- through the CLI ----------------------------------------------------------------------------


def write_params(path: Path, raw: Path, out: Path, max_failed: float, workers: int = 1) -> Path:
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["data"].update(
        raw_dir=str(raw),
        processed_dir=str(out),
        size=SIZE,
        workers=workers,
        max_failed_fraction=max_failed,
    )
    path.write_text(yaml.safe_dump(params))
    return path


def test_cli_fails_when_too_many_files_fail(raw_tree: Path, tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", raw_tree, tmp_path / "out", max_failed=0.3)
    command = ["-q", "--params", str(params), "convert", "--workers", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "pneumoseg", *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pneumoseg convert:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("pneumoseg convert: error: ")
    assert "max_failed_fraction" in errors[0] and "50.0%" in errors[0]
    assert "6 converted" in proc.stdout and "6 failed" in proc.stdout  # the summary line
    assert (tmp_path / "out" / "failures.csv").is_file()
    for secret in SECRETS:
        assert secret not in proc.stdout + proc.stderr, secret


def test_cli_succeeds_below_the_threshold_and_flags_override(
    raw_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 6 of 12 failed: exactly the threshold, which is not "more than" it
    params = write_params(tmp_path / "params.yaml", raw_tree, tmp_path / "unused", max_failed=0.5)
    out = tmp_path / "flagged"
    code = cli.main(["-q", "--params", str(params), "convert", "--out", str(out), "--size", "48"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "6 converted" in captured.out
    assert not (tmp_path / "unused").exists()
    image = read_png(out / "images" / f"{GOOD['jpeg8'].image_id}.png")
    assert image.shape == (48, 48)


# --- other layouts and formats ------------------------------------------------------------------


def test_stage2_layout_with_absolute_rle(tmp_path: Path) -> None:
    raw = tmp_path / "siim2"
    shapes = {30: (128, 128), 31: (96, 112), 32: (128, 128), 33: (112, 96)}
    masks = {
        30: [
            ellipse((128, 128), (0.5, 0.3), (0.2, 0.1)),
            ellipse((128, 128), (0.6, 0.35), (0.1, 0.1)),
        ],
        31: [ellipse((96, 112), (0.4, 0.75), (0.15, 0.08))],
        32: [],
    }
    lines = ["ImageId,EncodedPixels"]
    for n, shape in shapes.items():
        picture = radiograph(max(shape), seed=n)[: shape[0], : shape[1]]
        write_dicom(raw / "stage_2_images" / f"{image_id(n)}.dcm", picture)
        if n in masks:
            lines += [f"{image_id(n)},{rle_encode(m, 'absolute')}" for m in masks[n]] or [
                f"{image_id(n)},-1"
            ]
    (raw / "stage_2_train.csv").write_text("\n".join(lines) + "\n")
    result = run_convert(raw, tmp_path / "out", dialect="auto", workers=1)
    s = result.summary
    assert (s.converted, s.train, s.test, s.positive, s.failed) == (4, 3, 1, 2, 0)
    for n, rows in masks.items():
        union = np.zeros(shapes[n], np.uint8)
        for m in rows:
            union |= m
        row = result.manifest[image_id(n)]
        assert int(row["mask_pixels"]) == int(union.sum())
        mask = read_png(result.out / "masks" / f"{image_id(n)}.png")
        expected = cv2.resize(union, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST) * 255
        np.testing.assert_array_equal(mask, expected)
    assert result.manifest[image_id(33)]["split"] == "test"


@pytest.mark.parametrize(
    "name",
    ["MR_small_jpeg_ls_lossless.dcm", "693_J2KI.dcm", "JPGExtended.dcm"],
)
def test_pydicom_test_files_decode(name: str) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    result = read_dicom(path)
    assert result.image.dtype == np.uint8
    assert result.image.shape == (ds.Rows, ds.Columns)
    assert result.image.std() > 10
    assert result.meta["bits_stored"] == ds.BitsStored


def test_window_is_applied_exactly(tmp_path: Path) -> None:
    picture = radiograph(64, seed=9)
    center, width = 1800.0, 2400.0
    path = write_dicom(
        tmp_path / "w.dcm", picture, photometric="MONOCHROME1", bits=12, window=(center, width)
    )
    stored = np.round(picture.astype(float) * 4095 / 255)  # MONOCHROME2 sense
    stored = 4095 - stored  # as stored in MONOCHROME1
    # DICOM PS3.3 C.11.2.1.2.1, LINEAR, with the output range 0..255:
    #   x <= c - 0.5 - (w-1)/2 -> ymin; x > c - 0.5 + (w-1)/2 -> ymax;
    #   else y = ((x - (c - 0.5)) / (w - 1) + 0.5) * (ymax - ymin) + ymin
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    inside = ((stored - (center - 0.5)) / (width - 1) + 0.5) * 255
    expected = np.where(stored <= low, 0.0, np.where(stored > high, 255.0, inside))
    expected = 255 - np.round(expected)  # MONOCHROME1: high values display dark
    image = read_dicom(path).image
    assert image.shape == picture.shape
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    assert (image == 0).any() and (image == 255).any()  # the window clips both ends


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_window_functions_follow_the_standard(tmp_path: Path, function: str) -> None:
    """PS3.3 C.11.2.1.3: LINEAR_EXACT and SIGMOID, each output range mapped to 0..255."""
    picture = radiograph(64, seed=12)
    center, width = 2000.0, 1500.0
    path = write_dicom(
        tmp_path / "f.dcm", picture, bits=12, window=(center, width),
        extra={"VOILUTFunction": function},
    )  # fmt: skip
    x = np.round(picture.astype(float) * 4095 / 255)  # the stored values
    if function == "LINEAR_EXACT":
        #  x <= c - w/2 -> ymin; x > c + w/2 -> ymax; else ((x - c) / w + 0.5) * (ymax - ymin)
        inside = ((x - center) / width + 0.5) * 255
        expected = np.where(
            x <= center - width / 2, 0.0, np.where(x > center + width / 2, 255.0, inside)
        )
    else:  # y = (ymax - ymin) / (1 + exp(-4 (x - c) / w)) + ymin
        expected = 255 / (1 + np.exp(-4 * (x - center) / width))
    image = read_dicom(path).image
    assert np.abs(image.astype(int) - np.round(expected).astype(int)).max() <= 1


def test_voi_lut_sequence_on_integer_values_and_its_output_range(tmp_path: Path) -> None:
    """PS3.3 C.11.2.1.1: the modality output (here with an intercept: float values) indexes the
    LUT; values before the first mapped one take the first entry, after the last the last; the
    LUT's 12-bit output range (not its smallest and largest entries) maps to 0..255."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    picture = radiograph(64, seed=13)
    stored = np.round(picture.astype(float) * 4095 / 255).astype(np.uint16)
    first, entries = -800, 3000  # maps modality values -800..2199
    lut = np.round(100 + 2900 * (np.arange(entries) / (entries - 1)) ** 0.5).astype(int)
    item = Dataset()
    item.add_new(0x00283002, "SS", [entries, first, 12])  # LUT Descriptor (signed first value)
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    rescale = {"RescaleIntercept": "-1000", "RescaleSlope": "1"}
    path = write_dicom(
        tmp_path / "lut.dcm", picture, bits=16, stored=stored,
        extra=rescale | {"VOILUTSequence": Sequence([item])},
    )  # fmt: skip
    modality = stored.astype(int) - 1000
    index = np.clip(modality - first, 0, entries - 1)
    expected = np.round(lut[index] * 255 / 4095)  # 0..4095 -> 0..255, not min-max stretched
    image = read_dicom(path).image
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    assert image.max() < 200  # the LUT never reaches its range's top (3000 of 4095)


def test_8bit_monochrome1_is_inverted_exactly(tmp_path: Path) -> None:
    picture = radiograph(64, seed=10)
    path = write_dicom(tmp_path / "m1.dcm", picture, photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_dicom(path).image, picture)


def test_high_bit_depth_without_voi_is_stretched(tmp_path: Path) -> None:
    picture = radiograph(64, seed=11)
    stored = (1000 + picture.astype(np.uint16) * 8).astype(np.uint16)  # narrow 16-bit band
    path = write_dicom(tmp_path / "h.dcm", picture, bits=16, stored=stored)
    image = read_dicom(path).image
    assert pearson(image, picture) > 0.99
    assert image.min() <= 5 and image.max() >= 250  # percentile stretch to the full range


def test_unreadable_files_raise_dicom_read_error(tmp_path: Path) -> None:
    text = tmp_path / "x.dcm"
    text.write_text("hello")
    with pytest.raises(DicomReadError, match="not a DICOM"):
        read_dicom(text)
    empty = write_dicom(tmp_path / "e.dcm", radiograph(32), pixel_data=False)
    with pytest.raises(DicomReadError, match="no pixel data"):
        read_dicom(empty)


def panicking_rle_dicom(path: Path) -> Path:
    """A 16-bit RLE Lossless DICOM whose second segment offset is corrupted so that the Rust
    decoder (pylibjpeg-rle) panics (``pyo3_runtime.PanicException``, a BaseException)."""
    picture = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    write_dicom(path, picture, bits=16, transfer_syntax="rle")
    raw = bytearray(path.read_bytes())
    fragment = raw.rfind(b"\xfe\xff\x00\xe0")  # the item of the frame's only fragment
    raw[fragment + 8 + 8] = 0  # RLE header: low byte of segment 2's offset
    path.write_bytes(bytes(raw))
    return path


def test_a_decoder_panic_is_a_one_line_failure(tmp_path: Path) -> None:
    from pneumoseg.dicom import DicomReadError, read_dicom

    path = panicking_rle_dicom(tmp_path / "1.2.3.4.dcm")
    with pytest.raises(DicomReadError, match="pixel data cannot be decoded: PanicException"):
        read_dicom(path)


def _raw_with(tmp_path: Path, bad: list[str]) -> Path:
    """A raw folder of six good test DICOMs plus, for each name in ``bad``, a file so named."""
    raw = tmp_path / "raw"
    for k in range(6):
        write_dicom(raw / f"1.2.9.{k}.dcm", radiograph(48, k))
    (raw / "train-rle.csv").write_text("ImageId, EncodedPixels\n")
    for name in bad:
        panicking_rle_dicom(raw / name)
    return raw


@pytest.mark.timeout(180)  # the round-1 pool waited forever for the task of a dead worker
def test_two_workers_survive_a_panicking_decoder(tmp_path: Path) -> None:
    raw = _raw_with(tmp_path, ["1.2.9.99.dcm"])
    summary = convert(raw, tmp_path / "out", 32, workers=2, progress=False)
    assert (summary.converted, summary.failed) == (6, 1)
    failures = (tmp_path / "out/failures.csv").read_text()
    assert "1.2.9.99.dcm" in failures and "PanicException" in failures


@pytest.mark.timeout(180)
def test_a_worker_that_dies_is_isolated_and_the_rest_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode that kills its process (a segfault in native code) breaks the pool: the file
    is found by converting the suspects one at a time, and every other file is converted."""
    import os

    from pneumoseg import conversion

    raw = _raw_with(tmp_path, [])
    original = conversion.convert_one

    def dies_on_one(task: conversion.Task, settings: conversion.Settings) -> dict:
        if task.image_id == "1.2.9.3":
            os._exit(139)  # the worker process dies as on a segfault
        return original(task, settings)

    monkeypatch.setattr(conversion, "convert_one", dies_on_one)  # forked workers inherit it
    summary = conversion.convert(raw, tmp_path / "out", 32, workers=2, progress=False)
    assert (summary.converted, summary.failed) == (5, 1)
    failures = (tmp_path / "out/failures.csv").read_text()
    assert "1.2.9.3.dcm,the decoder killed its worker process" in failures


@pytest.mark.timeout(180)
def test_a_file_over_the_time_limit_is_a_failure_row(tmp_path: Path) -> None:
    """A decode that outlasts ``data.file_timeout`` ends its worker (SIGALRM at its default
    action, which also stops native code) and is named; one worker is enough."""
    raw = _raw_with(tmp_path, [])
    summary = convert(raw, tmp_path / "out", 32, workers=1, file_timeout=1e-6, progress=False)
    assert (summary.converted, summary.failed) == (0, 6)
    failures = (tmp_path / "out/failures.csv").read_text().splitlines()[1:]
    assert all("longer than data.file_timeout (1e-06 s)" in line for line in failures)


def test_dicoms_are_found_by_content_under_any_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hospital exports: ``.DCM`` in capitals, no extension at all (named by the SOP Instance
    UID, dots included); every such file is converted under its ImageId, and what is not DICOM
    (notes, a DICOMDIR index, the csv files) is counted in one line, never converted."""
    raw = tmp_path / "export"
    names = {
        40: f"dicom-images-train/a/{image_id(40)}.dcm",  # the SIIM way
        41: f"dicom-images-train/b/{image_id(41)}.DCM",  # capitals
        42: f"PACS/EXPORT0001/{image_id(42)}",  # no extension: the UID is the name
        43: f"PACS/EXPORT0002/{image_id(43)}",  # a test image, no extension
    }
    for n, name in names.items():
        write_dicom(raw / name, radiograph(96, seed=n))
    write_dicom(raw / "PACS/DICOMDIR", radiograph(32, seed=1))  # an index, not an image
    (raw / "PACS/notes.txt").write_text("exported 2026-12-01\n")
    mask = ellipse((96, 96), (0.5, 0.3), (0.2, 0.1))
    lines = ["ImageId, EncodedPixels", f"{image_id(40)}, {rle_encode(mask, 'relative')}"]
    lines += [f"{image_id(n)}, -1" for n in (41, 42)]
    (raw / "train-rle.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="pneumoseg"):
        result = run_convert(raw, tmp_path / "out", dialect="relative", workers=1)
    s = result.summary
    assert (s.converted, s.train, s.test, s.positive, s.failed) == (4, 3, 1, 1, 0)
    assert set(result.manifest) == {image_id(n) for n in names}
    assert result.manifest[image_id(43)]["split"] == "test"
    (line,) = [r.getMessage() for r in caplog.records if "not DICOM" in r.getMessage()]
    assert line.startswith(f"convert: 3 file(s) under {raw} are not DICOM images")
    for name in ("DICOMDIR", "notes.txt", "train-rle.csv"):
        assert name in line


def test_predict_finds_dicoms_by_content(tmp_path: Path) -> None:
    from pneumoseg.commands.predict import find_inputs

    folder = tmp_path / "in"
    write_dicom(folder / "x" / "CASE1.DCM", radiograph(32, seed=1))
    write_dicom(folder / "1.2.3.4.5", radiograph(32, seed=2))
    (folder / "readme.txt").write_text("not an image\n")
    files, failures = find_inputs([str(folder)])
    assert [p.name for p in files] == ["1.2.3.4.5", "CASE1.DCM"] and failures == []
