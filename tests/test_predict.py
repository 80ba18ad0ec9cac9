"""``pneumoseg predict`` and the served model's request format on a tiny untrained ensemble
(no training: two randomly initialised fold models and a hand-written postprocess.json)."""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import IDENTIFYING
from pipeline_helpers import cli as run_cli
from pipeline_helpers import write_params

DECODER = [32, 16, 8, 8, 4]


def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    """Run ``pneumoseg`` in-process in ``cwd``; (exit code, stdout, stderr), any exit code."""
    return run_cli(*args, cwd=cwd, check=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """params.yaml + models/ (folds/fold<k>/model.pt, postprocess.json) without training."""
    import torch

    from pneumoseg.models import build_model, save_model_file
    from pneumoseg.params import ModelParams

    root = tmp_path_factory.mktemp("predict")
    write_params(root / "params.yaml")
    cfg = ModelParams(encoder="tu-mobilenetv3_small_100", decoder_channels=DECODER)
    for k in (0, 1):
        torch.manual_seed(k)
        meta = cfg.model_dump() | {"size": 64, "fold": k, "mlflow_run_id": None}
        save_model_file(
            root / f"models/folds/fold{k}/model.pt", build_model(cfg).state_dict(), meta
        )
    post = {
        "top_threshold": 0.0,
        "bottom_threshold": 0.0,
        "min_area": 0.0,
        "min_component_area": 0.0,
        "cls_gate": None,
        "size": 32,
    }
    (root / "models/postprocess.json").write_text(json.dumps(post))
    return root


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def dicoms(
    tmp_path: Path, make_dicom: Callable[..., Path], radiograph: Callable[..., np.ndarray]
) -> Path:
    """A folder of three readable DICOMs (one nested, mixed formats/sizes) and a fake .dcm."""
    root = tmp_path / "in"
    make_dicom(root / "1.2.3.1.dcm", radiograph(96, 1)[:, :80])
    make_dicom(
        root / "sub/1.2.3.2.dcm",
        radiograph(72, 2),
        photometric="MONOCHROME1",
        bits=12,
        transfer_syntax="rle",
    )
    make_dicom(root / "1.2.3.3.DCM", radiograph(64, 3), transfer_syntax="jpeg_baseline")
    (root / "bad.dcm").write_text("not a DICOM file\n")
    return root


def test_predict_writes_outputs_and_reports_unreadable_inputs(
    project: Path, dicoms: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = cli(
        "-q", "predict", "--model", "models", "--input", str(dicoms), "nowhere.dcm",
        "--out", str(out), cwd=project,
    )  # fmt: skip
    assert code == 0, stderr
    assert "skipped bad.dcm: not a DICOM file" in stderr
    assert "skipped nowhere.dcm: no such file or folder" in stderr
    assert "3 images" in stdout and "2 failed" in stdout
    preds = rows(out / "predictions.csv")
    assert [r["ImageId"] for r in preds] == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert list(preds[0]) == ["ImageId", "EncodedPixels", "has_pneumothorax", "area_px", "max_prob"]
    assert sorted(r["path"] for r in rows(out / "failures.csv")) == ["bad.dcm", "nowhere.dcm"]
    from pneumoseg.rle import rle_decode

    for r, shape in zip(preds, [(96, 80), (72, 72), (64, 64)], strict=True):
        mask = cv2.imread(str(out / "masks" / f"{r['ImageId']}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}  # native size
        assert np.array_equal(rle_decode(r["EncodedPixels"], *shape), (mask > 0).astype(np.uint8))
        assert int(r["area_px"]) == int((mask > 0).sum())
        assert int(r["has_pneumothorax"]) == int(int(r["area_px"]) > 0)
        assert 0.0 <= float(r["max_prob"]) <= 1.0
        overlay = cv2.imread(str(out / "overlays" / f"{r['ImageId']}.png"), cv2.IMREAD_COLOR)
        assert overlay.shape == (*shape, 3)
    # nothing identifying from the DICOM headers in any output
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [v for v in IDENTIFYING.values() if v.encode() in data], path


def test_predict_fails_cleanly_when_nothing_is_readable(project: Path, tmp_path: Path) -> None:
    (tmp_path / "x.dcm").write_bytes(b"\0" * 10)
    code, _, stderr = cli(
        "-q", "predict", "--model", "models", "--input", str(tmp_path / "x.dcm"),
        "--out", str(tmp_path / "out"), cwd=project,
    )  # fmt: skip
    assert code == 1
    assert "skipped x.dcm" in stderr and "no input could be read" in stderr
    assert [r["path"] for r in rows(tmp_path / "out/failures.csv")] == ["x.dcm"]
    code, _, stderr = cli(
        "predict", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), cwd=project
    )
    assert code == 1 and "no DICOM files found" in stderr


def test_predict_rejects_unknown_model_folders(project: Path, dicoms: Path, tmp_path: Path) -> None:
    for model, message in (
        ("missing_models", "no such folder"),
        (str(tmp_path), "neither an MLflow model folder"),
    ):
        code, _, stderr = cli(
            "-q", "predict", "--model", model, "--input", str(dicoms), "--out",
            str(tmp_path / "o"), cwd=project,
        )  # fmt: skip
        assert code == 1 and message in stderr, stderr
        assert stderr.count("\n") <= 2  # one line per problem, no traceback


def test_predict_device_flag(project: Path, dicoms: Path, tmp_path: Path) -> None:
    """--device cpu predicts what the default (no GPU here) predicts; a device that is not
    there, or is not a device, is one line."""
    import torch

    args = ("-q", "predict", "--model", "models", "--input", str(dicoms))
    assert cli(*args, "--out", str(tmp_path / "default"), cwd=project)[0] == 0
    assert cli(*args, "--out", str(tmp_path / "cpu"), "--device", "cpu", cwd=project)[0] == 0
    default, cpu = (tmp_path / d / "predictions.csv" for d in ("default", "cpu"))
    assert cpu.read_bytes() == default.read_bytes()
    for device, message in (("cuda", "no CUDA device here"), ("gpu0", "expected cpu, cuda")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        out = str(tmp_path / device)
        code, _, stderr = cli(*args, "--out", out, "--device", device, cwd=project)
        assert code == 1 and message in stderr and stderr.count("\n") == 1, stderr


def test_served_frame_matches_predict(project: Path, dicoms: Path, tmp_path: Path) -> None:
    """The pyfunc's request path (base64 DICOM or image array) gives predict's numbers."""
    import pandas as pd

    from pneumoseg.commands.predict import load_model
    from pneumoseg.dicom import read_dicom
    from pneumoseg.params import load_params
    from pneumoseg.serving import RequestError, predict_frame

    out = tmp_path / "out"
    code, _, stderr = cli(
        "-q", "predict", "--model", "models", "--input", str(dicoms), "--out", str(out),
        cwd=project,
    )  # fmt: skip
    assert code == 0, stderr
    expected = {r["ImageId"]: r for r in rows(out / "predictions.csv")}
    bundle = load_model(load_params(project / "params.yaml"), str(project / "models"))
    files = sorted(p for p in dicoms.rglob("*") if p.stem.startswith("1.2.3"))
    plain = dicoms / "1.2.3.1.dcm"  # 8-bit MONOCHROME2: its pixels are the image itself
    frame = pd.DataFrame(
        [
            {"image_id": f.stem, "dicom_b64": base64.b64encode(f.read_bytes()).decode()}
            for f in files
        ]
        + [{"image_id": "1.2.3.1", "image": read_dicom(plain).image.tolist()}]
    )
    got = predict_frame(bundle, frame)
    assert list(got.columns) == list(expected["1.2.3.1"])
    assert list(got["ImageId"]) == [f.stem for f in files] + ["1.2.3.1"]  # order, duplicates
    for r in got.to_dict(orient="records"):
        assert {k: str(v) for k, v in r.items()} == expected[r["ImageId"]]
    absolute = predict_frame(bundle, frame.iloc[:1], "absolute")
    from pneumoseg.rle import rle_decode

    h, w = read_dicom(files[0]).image.shape
    assert np.array_equal(
        rle_decode(absolute.iloc[0]["EncodedPixels"], h, w, "absolute"),
        rle_decode(got.iloc[0]["EncodedPixels"], h, w, "relative"),
    )
    bad = [
        ({"image_id": "a", "dicom_b64": "%%%"}, "a: dicom_b64 is not valid base64"),
        ({"image_id": "b", "dicom_b64": base64.b64encode(b"x").decode()}, "b: not a DICOM"),
        ({"image_id": "c"}, "c: give exactly one of dicom_b64 and image"),
        ({"image_id": "d", "image": [[1, 2], [3]]}, "d: image must be"),
        ({"image_id": "e", "image": [[1, 300]]}, "e: image values must be in 0..255"),
    ]
    for row, message in bad:
        with pytest.raises(RequestError, match=message):
            predict_frame(bundle, pd.DataFrame([row]))
    with pytest.raises(RequestError, match="unknown input columns"):
        predict_frame(bundle, pd.DataFrame([{"image_id": "f", "pixels": 1}]))


def test_served_model_limits_refuse_before_decoding(
    project: Path,
    make_dicom: Callable[..., Path],
    radiograph: Callable[..., np.ndarray],
    tmp_path: Path,
) -> None:
    """serving.max_rows and serving.max_image_pixels: one line naming the row and the key."""
    import pandas as pd

    from pneumoseg.commands.predict import load_model
    from pneumoseg.params import load_params
    from pneumoseg.serving import RequestError, predict_frame

    params = load_params(project / "params.yaml", {"serving.max_rows": 3})
    params.serving.max_image_pixels = 50 * 50
    bundle = load_model(params, str(project / "models"))
    tiny = [[0, 40], [80, 120]]
    with pytest.raises(RequestError, match=r"4 rows, more than serving.max_rows \(3\)"):
        predict_frame(bundle, pd.DataFrame([{"image_id": "r", "image": tiny}] * 4))
    big = make_dicom(tmp_path / "big.dcm", radiograph(64, 1))  # 64 x 64 > 2,500 pixels
    row = {"image_id": "big", "dicom_b64": base64.b64encode(big.read_bytes()).decode()}
    with pytest.raises(RequestError, match=r"big: image of 64 x 64 x 1 frame\(s\) exceeds"):
        predict_frame(bundle, pd.DataFrame([row]))
    with pytest.raises(RequestError, match="arr: image of 51 x 51 exceeds serving.max_image"):
        predict_frame(bundle, pd.DataFrame([{"image_id": "arr", "image": [[0] * 51] * 51}]))
    blob = base64.b64encode(bytes(6 * 2500 + (1 << 20) + 8)).decode()
    with pytest.raises(RequestError, match="blob: dicom_b64 holds 1.1 MB, more than an image"):
        predict_frame(bundle, pd.DataFrame([{"image_id": "blob", "dicom_b64": blob}]))
    assert len(predict_frame(bundle, pd.DataFrame([{"image_id": "ok", "image": tiny}]))) == 1


def test_find_inputs_sorts_dedupes_and_reports(tmp_path: Path) -> None:
    from pneumoseg.commands.predict import find_inputs

    for rel in ("b/2.dcm", "a/1.DCM", "c/2.dcm", "a/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    files, failures = find_inputs([str(tmp_path), str(tmp_path / "a/1.DCM"), "gone"])
    assert [f.stem for f in files] == ["1", "2"]
    assert failures == [
        ("gone", "no such file or folder"),
        ("2.dcm", "duplicate ImageId 2 (kept another)"),
    ]


def test_versions_registered_with_an_older_schema_still_load() -> None:
    """A round-1 registered version carries the whole params.yaml of its day (a top-level
    seed, train.optimizer as a string, submit.sample_submission ...): serving reads only the
    settings it needs from it."""
    from pneumoseg.serving import serving_params

    round_1 = {
        "seed": 42,
        "data": {"size": 192, "clahe": {"enabled": True, "clip_limit": 3.0, "tile_grid": 4}},
        "train": {"optimizer": "adam", "weight_decay": 0.0, "momentum": 0.9},
        "oof": {"size": 128, "tta_hflip": False, "batch_size": 8, "checkpoints": "final"},
        "submit": {"dialect": "absolute", "sample_submission": None},
    }
    params = serving_params(round_1)
    assert (params.data.size, params.data.clahe.enabled, params.data.clahe.tile_grid) == (
        192,
        True,
        4,
    )
    assert (params.oof.tta_hflip, params.oof.batch_size, params.submit.dialect) == (
        False,
        8,
        "absolute",
    )


def test_prefetched_keeps_the_order_and_raises_where_the_producer_failed() -> None:
    import threading

    from pneumoseg.inference import prefetched

    threads: set[str] = set()

    def items(fail_at: int | None = None):
        for i in range(10):
            threads.add(threading.current_thread().name)
            if i == fail_at:
                raise ValueError(f"item {i}: bad")
            yield i

    assert list(prefetched(items(), 3)) == list(range(10))
    assert threads == {"pneumoseg-prefetch"}  # produced beside the consumer, not in it
    got = []
    with pytest.raises(ValueError, match="item 4: bad"):
        for i in prefetched(items(fail_at=4), 2):
            got.append(i)
    assert got == [0, 1, 2, 3]
    early = prefetched(items(), 1)
    assert next(early) == 0
    early.close()  # a consumer that stops early releases the producer
