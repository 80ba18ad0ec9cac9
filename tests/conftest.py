"""Shared test setup: offline environment flags and synthetic DICOM fixtures.

``make_dicom(path, image, ...)`` writes a real DICOM file (pydicom 3) whose header carries
distinctive identifying values (:data:`IDENTIFYING`) so de-identification can be checked by
grepping outputs; ``radiograph(size, seed)`` draws a chest-like uint8 picture whose asymmetry
(marker top-left, mediastinum right of centre) reveals flips and inversions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engines import Postgres, running_postgres
from pipeline_helpers import (
    PINNED_THREADS,
    DvcProject,
    Pipeline,
    pin_threads,
    probed_pipeline,
    reproduced_project,
)

for _key, _value in {
    # the tests' trainings use one thread each (pin_threads): bit-for-bit comparisons hold
    # whatever else runs, and pytest-xdist's two workers share the two cores without fighting
    "PNEUMOSEG_THREADS": PINNED_THREADS,
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


def write_dicom(
    path: str | Path,
    image: np.ndarray,
    *,
    patient_name: str = IDENTIFYING["PatientName"],
    **kwargs: Any,
) -> Path:
    """:func:`pneumoseg.demo.dicom_writer.write_dicom` with the :data:`IDENTIFYING` header
    values (``patient_name`` replaces the name), so de-identification can be checked."""
    from pneumoseg.demo import dicom_writer

    tags = IDENTIFYING | {"PatientName": patient_name}
    return dicom_writer.write_dicom(path, image, tags=tags, **kwargs)


@pytest.fixture
def make_dicom() -> Callable[..., Path]:
    """Factory: ``make_dicom(path, image_uint8_2d, *, photometric, bits, transfer_syntax,
    window, patient_name, ...)`` -> path (see :func:`write_dicom`)."""
    return write_dicom


@pytest.fixture(name="radiograph")
def radiograph_fixture() -> Callable[..., np.ndarray]:
    """Factory: ``radiograph(size, seed)`` -> uint8 chest-like image (see :func:`radiograph`)."""
    return radiograph


# The tiny pipeline's second ensemble member: smaller decoder, trained at half the size (its maps
# are resized to the common size), so every stage runs on a two-member ensemble there.
TINY_MEMBER = {
    "members": {
        "tiny": {
            "model": {"decoder_channels": [16, 8, 8, 4, 4]},
            "parts": [
                {"size": 32, "epochs": 2, "lr": 0.003, "loss": {"bce": 1, "dice": 1},
                 "sample_rate": {"start": 0.8, "end": 0.5, "shape": "linear"}}
            ],
        }
    }
}  # fmt: skip


# The tiny pipeline fine-tunes fold 0 on pseudo-labels (thresholds low enough that the barely
# trained tiny model labels some test images), so oof, submit and register use finetune@0's model.
TINY_PSEUDO = {
    "folds": [0],
    "positive_confidence": 0.5,
    "negative_confidence": 0.45,
    "pixel_threshold": 0.45,
    "finetune": {
        "parts": [
            {"size": None, "epochs": 1, "lr": 0.001, "loss": {"bce": 1, "dice": 1},
             "sample_rate": {"start": 0.5, "end": 0.5, "shape": "constant"}}
        ]
    },
}  # fmt: skip


def built_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]
) -> tuple[Path, Any]:
    """``build(folder)`` once for the whole test run, also across pytest-xdist's workers: the
    first to get here builds it under a lock, the others wait and reuse it (``build`` returns
    what describes it, as JSON). Tests read it, and copy it before they change anything."""
    from pneumoseg.locks import file_lock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, shared by its workers
    home = root / f"built-{name}"
    home.mkdir(exist_ok=True)
    with file_lock(home / ".lock"):
        done, failed = home / "done.json", home / "failed.txt"
        if failed.is_file():  # one failure is enough: the other tests say so without retrying
            pytest.fail(f"the shared {name} project could not be built: {failed.read_text()}")
        if not done.is_file():
            try:
                with pytest.MonkeyPatch.context() as mp:
                    pin_threads(mp)  # tests compare their retrainings with these weights
                    described = build(home / "p")
            except Exception as exc:
                failed.write_text(f"{type(exc).__name__}: {str(exc)[-3000:]}")
                raise
            done.write_text(json.dumps(described))
        return home / "p", json.loads(done.read_text())


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tiny demo project after one run of every stage (trained once for the whole test
    run), with a second ensemble member; tests that change files work on
    ``tiny_pipeline.copy(tmp_path / "p")``."""

    def build(path: Path) -> Any:
        overrides = {"ensemble": TINY_MEMBER, "pseudo_label": TINY_PSEUDO}
        return probed_pipeline(path, overrides).reports

    path, reports = built_once(tmp_path_factory, "tiny", build)
    return Pipeline(path, reports)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server on 127.0.0.1 for the whole test run (see tests/engines.py)."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory: pytest.TempPathFactory) -> DvcProject:
    """A git + DVC tiny project after one real `dvc repro` from nothing, committed (tag
    ``base``); tests work on ``dvc_project.copy(tmp_path / "p")``."""
    path, ran = built_once(tmp_path_factory, "dvc", lambda p: sorted(reproduced_project(p).ran))
    return DvcProject(path, set(ran))


# The longest test files first (longest processing time first), so that pytest-xdist's two
# workers finish together instead of one waiting on the other's last long file. The Makefile
# passes --no-loadscope-reorder, or xdist would order files by their number of tests instead.
# The first two need different shared projects, which the two workers then build side by side.
# Seconds from a fresh-clone run (2026-12-07, 2 cores) in the comments.
LONGEST_FIRST = (
    "test_results.py",  # 170: the DVC project, a queued retraining, a threshold-only experiment
    "faults/test_faults.py",  # 330: the tiny pipeline; kills, signals, torn files, concurrency
    "faults/test_stage_kills.py",  # 180
    "test_study.py",  # 150
    "test_train.py",  # 145
    "test_pseudo_labels.py",  # 100
    "test_secrets.py",  # 95
    "faults/test_tracking_outage.py",  # 65
    "test_registry.py",  # 65
    "test_bench.py",  # 55
    "test_ddp.py",  # 45
    "faults/test_serving.py",  # 30
    "test_arrays.py",  # 25
    "test_postprocess_stages.py",
    "test_group_thresholds.py",
    "test_pipeline.py",
    "test_ensemble_members.py",
    "test_experiments.py",
    # make test-team: one shared project (the DVC project, built by the first file's worker)
    # while the other worker reproduces its own pipeline through the tracking server
    "team/test_dvc_remote.py",  # 100: builds the DVC project
    "team/test_tracking_server.py",  # 240: its own `dvc repro` first
    "team/test_optuna_postgres.py",  # 145
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a file stays
