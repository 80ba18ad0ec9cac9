"""Converting a SIIM-layout DICOM tree + RLE csv into processed PNG images/masks, the manifest
and the failures list (the ``convert`` stage's work).

Every DICOM file under the raw folder is found (any nesting, by its content: ``<ImageId>.dcm``,
``.DCM``, or a name without extension, which is then the ImageId). An ImageId listed in the
RLE csv is a training image, any other is a test image. Bad files are reported in
``failures.csv`` and the rest converted; the stage fails only when the failed fraction exceeds
``data.max_failed_fraction``.
"""

from __future__ import annotations

import csv
import errno
import logging
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pneumoseg.artifacts import (
    BASE_MANIFEST_FIELDS,
    FAILURES,
    MANIFEST,
    write_csv,
    write_dataset_info,
    write_test_order,
)
from pneumoseg.dicom import (
    SAFE_FIELDS,
    DicomReadError,
    describe_others,
    find_dicom_files,
    image_id_of,
    prepare_image,
    read_dicom,
    resize_mask,
)
from pneumoseg.files import staged_dir
from pneumoseg.params import ClaheParams
from pneumoseg.progress import progress_bar
from pneumoseg.redact import id_key, pseudonym
from pneumoseg.rle import RLEError, decode_rows, read_rle_csv

log = logging.getLogger(__name__)

RLE_CSV_NAMES = ("train-rle.csv", "stage_2_train.csv")
SAMPLE_SUBMISSION = "sample_submission.csv"
MANIFEST_FIELDS = (*BASE_MANIFEST_FIELDS, *SAFE_FIELDS)
FAILURE_FIELDS = ("path", "reason")


class ConvertError(RuntimeError):
    """The conversion as a whole cannot proceed or failed too often."""


@dataclass(frozen=True)
class Task:
    """One DICOM to convert; ``rle_rows`` is None for test images."""

    image_id: str  # the file stem, or its pseudonym (data.pseudonymize_ids)
    path: str
    rle_rows: tuple[tuple[int, str], ...] | None
    rle_source: str
    dialect: str
    stem: str = ""  # the file stem, when image_id is a pseudonym: never written anywhere

    @property
    def name(self) -> str:
        """How the file is named in failures.csv and logs: ``<ImageId>.dcm`` only (SIIM
        folders are named after Study/Series UIDs, which must not leak)."""
        return f"{self.image_id}.dcm"

    def scrub(self, text: str) -> str:
        """``text`` with the file stem replaced by the pseudonym (error messages may hold it)."""
        return text.replace(self.stem, self.image_id) if self.stem else text


@dataclass(frozen=True)
class Settings:
    out_dir: str
    size: int
    clahe: ClaheParams
    file_timeout: float = 60.0


@dataclass
class ConvertSummary:
    converted: int
    train: int
    test: int
    positive: int
    failed: int
    manifest: Path
    failures: Path
    dialect: str  # of the training csv, as set or detected

    @property
    def failed_fraction(self) -> float:
        total = self.converted + self.failed
        return self.failed / total if total else 0.0

    def line(self) -> str:
        return (
            f"convert: {self.converted} converted ({self.train} train, {self.test} test, "
            f"{self.positive} with masks), {self.failed} failed"
            + (f" (see {self.failures})" if self.failed else "")
            + f"; masks read as {self.dialect} RLE"
        )


def find_rle_csv(raw_dir: Path) -> Path:
    """The SIIM training csv inside ``raw_dir`` (stage 1 or stage 2 name)."""
    for name in RLE_CSV_NAMES:
        if (raw_dir / name).is_file():
            return raw_dir / name
    raise ConvertError(f"{raw_dir}: no {' or '.join(RLE_CSV_NAMES)} found (set data.rle_csv)")


def pseudonyms(enabled: bool) -> Callable[[str], str]:
    """ImageId -> its keyed pseudonym (:func:`pneumoseg.redact.pseudonym`), or itself."""
    if not enabled:
        return lambda image_id: image_id
    key = id_key()
    return lambda image_id: pseudonym(image_id, key)


def find_dicoms(
    raw_dir: Path, alias: Callable[[str], str] = str
) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Map ImageId -> path for every DICOM file below ``raw_dir``, found by its content under
    any name (:func:`pneumoseg.dicom.find_dicom_files`); report duplicates, named
    ``<alias(ImageId)>.dcm`` (folders are named after Study/Series UIDs, which must not leak),
    and log one line for the files that are not DICOM."""
    found: dict[str, Path] = {}
    failures: list[tuple[str, str]] = []
    dicoms, others = find_dicom_files(raw_dir)
    if others:  # the csv files, and whatever else an export holds
        log.info("convert: %s", describe_others(others, raw_dir))
    for path in dicoms:
        image_id = image_id_of(path)
        name = alias(image_id)
        if image_id in found:
            failures.append((f"{name}.dcm", f"duplicate ImageId {name} (kept another)"))
            continue
        found[image_id] = path
    return found, failures


def convert_one(task: Task, settings: Settings) -> dict[str, Any]:
    """Convert one DICOM (and its mask); returns a manifest row or ``{"path", "reason"}``."""
    try:
        dicom = read_dicom(task.path)
        mask_pixels: int | str = ""
        mask = None
        if task.rle_rows is not None:
            mask = decode_rows(
                task.rle_rows,
                dicom.height,
                dicom.width,
                task.dialect,
                task.rle_source,
                task.image_id,
            )
            mask_pixels = int(mask.sum())
        out = Path(settings.out_dir)
        image = prepare_image(dicom.image, settings.size, settings.clahe)
        write_png(out / "images" / f"{task.image_id}.png", image)
        if mask is not None:
            small = resize_mask(mask, settings.size) * np.uint8(255)
            write_png(out / "masks" / f"{task.image_id}.png", small)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the whole conversion stops: no file would fare better
        return {"path": task.name, "reason": task.scrub(str(exc))}
    except (DicomReadError, RLEError) as exc:
        return {"path": task.name, "reason": task.scrub(str(exc))}
    row: dict[str, Any] = {
        "ImageId": task.image_id,
        "split": "train" if task.rle_rows is not None else "test",
        "has_mask": int(bool(mask_pixels)) if task.rle_rows is not None else "",
        "mask_pixels": mask_pixels,
        "height": dicom.height,
        "width": dicom.width,
    }
    row.update({k: dicom.meta.get(k, "") for k in SAFE_FIELDS})
    return row


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode with OpenCV, write with Python (so a full disk raises ``OSError(ENOSPC)``)."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode {path.name}")
    with path.open("wb") as fh:
        fh.write(data.tobytes())


def _convert_task(task: Task, settings: Settings) -> dict[str, Any]:
    """What a worker runs (a module-level name: ``convert_one`` is looked up in the worker).
    SIGALRM at its default action ends the worker after ``file_timeout`` seconds even inside
    native code; the pool then names the file like any crash."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, settings.file_timeout)
    try:
        return convert_one(task, settings)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _die_with_parent() -> None:
    """A worker's initializer: on Linux, the worker ends when the converting process does (a
    kill -9 of it would otherwise leave its pool's workers waiting for work for ever)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() == 1:  # the parent died before the line above
        os._exit(0)


def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(), initializer=_die_with_parent
    )


def _pooled(tasks: list[Task], settings: Settings, workers: int) -> Iterator[dict[str, Any]]:
    """Convert in ``workers`` processes. A worker that dies (a native decoder crashing the
    process) breaks the pool: the tasks it may have held are then converted one at a time,
    each in its own process, so the file that kills its worker is named in ``failures.csv``,
    and the rest goes on in a fresh pool."""
    queue, suspects = deque(tasks), deque[Task]()
    while queue or suspects:
        if suspects:
            yield _alone(suspects.popleft(), settings)
            continue
        inflight: dict[Future[dict[str, Any]], Task] = {}
        try:
            with _pool(workers) as pool:
                while queue or inflight:
                    while queue and len(inflight) < 2 * workers:
                        task = queue.popleft()
                        inflight[pool.submit(_convert_task, task, settings)] = task
                    done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                    for future in done:
                        task = inflight.pop(future)
                        try:
                            result = future.result()
                        except BrokenProcessPool:
                            suspects.append(task)
                            raise
                        yield result
        except BrokenProcessPool:
            suspects.extend(inflight.values())
            log.warning(
                "convert: a worker process died; converting %d file(s) one by one", len(suspects)
            )


def _alone(task: Task, settings: Settings) -> dict[str, Any]:
    """One task in a process of its own: its death is a failure row naming the file."""
    with _pool(1) as pool:
        try:
            return pool.submit(_convert_task, task, settings).result()
        except BrokenProcessPool:
            reason = (
                "the decoder killed its worker process (a crash in native code) or took longer "
                f"than data.file_timeout ({settings.file_timeout:g} s)"
            )
            return {"path": task.name, "reason": reason}


def _results(tasks: list[Task], settings: Settings, workers: int) -> Iterator[dict[str, Any]]:
    """Always in worker processes (one is enough), so a file that crashes or hangs its
    decoder is a failure row rather than the end of the conversion."""
    yield from _pooled(tasks, settings, max(1, workers))


def read_sample_ids(path: Path) -> list[str]:
    """The ImageIds (first column) of a Kaggle sample submission, in order."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return [r[0].strip() for r in list(csv.reader(fh))[1:] if r and r[0].strip()]


def convert(
    raw_dir: str | Path,
    out_dir: str | Path,
    size: int,
    rle_csv: str | Path | None = None,
    dialect: str = "auto",
    workers: int = 1,
    clahe: ClaheParams | None = None,
    file_timeout: float = 60.0,
    sample_submission: str | Path | None = None,
    progress: bool = True,
    pseudonymize: bool = False,
    id_map: str | Path | None = None,
) -> ConvertSummary:
    """Convert a SIIM-layout DICOM tree; see the module docstring."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise ConvertError(f"{raw_dir}: DICOM folder not found")
    csv_path = Path(rle_csv) if rle_csv else find_rle_csv(raw_dir)
    if not csv_path.is_file():
        raise ConvertError(f"{csv_path}: RLE csv not found")
    for key, path in (("data.rle_csv", rle_csv), ("data.sample_submission", sample_submission)):
        if path and not Path(path).resolve().is_relative_to(raw_dir.resolve()):
            raise ConvertError(
                f"{key}: {path} is outside data.raw_dir ({raw_dir}), the folder dvc.yaml "
                "declares as the input; move the file into it"
            )
    table = read_rle_csv(csv_path, dialect)
    alias = pseudonyms(pseudonymize)
    sample = Path(sample_submission) if sample_submission else raw_dir / SAMPLE_SUBMISSION
    if sample_submission and not sample.is_file():
        raise ConvertError(f"data.sample_submission: {sample} not found")
    dicoms, failures = find_dicoms(raw_dir, alias)
    failures = [{"path": p, "reason": r} for p, r in failures]
    for image_id, rows in table.rows.items():
        if image_id not in dicoms:
            reason = f"no DICOM for ImageId {alias(image_id)}"
            failures.append({"path": f"{csv_path.name}:{rows[0][0]}", "reason": reason})
    tasks = [
        Task(
            image_id=alias(stem),
            path=str(path),
            rle_rows=tuple(table.rows[stem]) if stem in table else None,
            rle_source=csv_path.name,
            dialect=table.dialect,
            stem=stem if pseudonymize else "",
        )
        for stem, path in dicoms.items()
    ]
    if id_map:  # only where the user asks (keep it outside the repo)
        pairs = ({"ImageId": t.stem, "pseudonym": t.image_id} for t in tasks)
        write_csv(id_map, ["ImageId", "pseudonym"], pairs)
    # everything is written into a fresh folder beside out_dir, which replaces it at the end:
    # a kill or a full disk leaves the previous output as it was
    rows: list[dict[str, Any]] = []
    with staged_dir(out_dir, "converting") as work:
        for sub in ("images", "masks"):
            (work / sub).mkdir(parents=True)
        settings = Settings(str(work), size, clahe or ClaheParams(), file_timeout)
        bar = progress_bar(total=len(tasks), desc="convert", bars_allowed=progress)
        for result in _results(tasks, settings, workers):
            (failures if "reason" in result else rows).append(result)
            bar.update()
        bar.close()
        rows.sort(key=lambda r: r["ImageId"])
        failures.sort(key=lambda r: r["path"])
        write_csv(work / MANIFEST, MANIFEST_FIELDS, rows)
        write_csv(work / FAILURES, FAILURE_FIELDS, failures)
        write_dataset_info(work, csv_path.name, table.dialect)
        if sample.is_file():  # the order `submit` writes its rows in
            write_test_order(work, [alias(i) for i in read_sample_ids(sample)])
    manifest, failures_csv = out_dir / MANIFEST, out_dir / FAILURES
    for failure in failures:
        log.warning("convert: skipped %s: %s", failure["path"], failure["reason"])
    return ConvertSummary(
        converted=len(rows),
        train=sum(r["split"] == "train" for r in rows),
        test=sum(r["split"] == "test" for r in rows),
        positive=sum(r["has_mask"] == 1 for r in rows),
        failed=len(failures),
        manifest=manifest,
        failures=failures_csv,
        dialect=table.dialect,
    )
