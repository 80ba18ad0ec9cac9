"""The on-disk contracts between stages, each read and written here and nowhere else.

- ``<processed>/manifest.csv``: one row per converted DICOM (``ImageId, split, has_mask,
  mask_pixels, height, width`` and the non-identifying fields of
  :data:`pneumoseg.dicom.SAFE_FIELDS`); ``images/<ImageId>.png`` (uint8 gray) and, for training
  images, ``masks/<ImageId>.png`` (0/255) beside it; ``test_order.csv`` (the ImageId order of
  the competition's sample submission, when there is one); ``dataset.json`` (the training
  csv's name and its RLE dialect, as set or detected: ``submit.dialect: null`` follows it).
- ``folds.csv``: ``ImageId, fold, has_mask`` sorted by ImageId.
- ``<oof>/``: ``probs.npy`` (uint8 N x S x S, round(prob*255)), ``masks.npy`` (uint8 0/1, the
  ground truth at S), ``ids.csv`` (``ImageId, fold, row``), optionally ``cls.npy`` (uint8 N), and
  ``models.json`` (per fold: the model files and how their checkpoints were selected) and
  ``learning_curves.csv`` (every fold's per-epoch history with a ``fold`` column: the rows of
  ``<models>/fold<k>/history.csv``; the top-level ``plots:`` of ``dvc.yaml`` overlay the folds).
- ``postprocess.json`` belongs to :mod:`pneumoseg.postprocess`, which tunes and applies it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.files import atomic_file, new_memmap, write_text_atomic

MANIFEST = "manifest.csv"
FAILURES = "failures.csv"
TEST_ORDER = "test_order.csv"
DATASET_INFO = "dataset.json"
BASE_MANIFEST_FIELDS = ("ImageId", "split", "has_mask", "mask_pixels", "height", "width")


def write_csv(path: str | Path, fields: Iterable[str], rows: Iterable[dict[str, Any]]) -> None:
    """A csv with a header row; ``rows`` are dicts keyed by ``fields``."""
    with atomic_file(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def check_unique_ids(rows: list[dict[str, str]], path: str | Path) -> None:
    """A csv keyed by ImageId must name each image once (else rows would silently collapse);
    the error names the duplicates and their lines."""
    lines: dict[str, list[int]] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        lines.setdefault(row.get("ImageId", ""), []).append(line)
    twice = {i: at for i, at in lines.items() if len(at) > 1}
    if twice:
        first = list(twice.items())[:3]
        shown = "; ".join(f"{i} (lines {', '.join(map(str, at))})" for i, at in first)
        more = f" and {len(twice) - 3} more" if len(twice) > 3 else ""
        raise ValueError(f"{path}: {len(twice)} duplicate ImageId(s): {shown}{more}")


def read_manifest(processed_dir: str | Path) -> dict[str, dict[str, str]]:
    """ImageId -> manifest row of ``<processed_dir>/manifest.csv``."""
    path = Path(processed_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run `pneumoseg convert` first)")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = [f for f in BASE_MANIFEST_FIELDS if rows and f not in rows[0]]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)}; restore it with "
            "`dvc checkout` or rerun `dvc repro -f -s convert`"
        )
    check_unique_ids(rows, path)
    return {r["ImageId"]: r for r in rows}


def native_size(row: dict[str, str]) -> tuple[int, int]:
    """(height, width) of a manifest row."""
    return int(row["height"]), int(row["width"])


def native_widths(
    ids: Iterable[tuple[str, int]], manifest: dict[str, dict[str, str]]
) -> np.ndarray:
    """The native width of each (ImageId, fold) row: what areas are scaled against."""
    return np.array([int(manifest[i]["width"]) for i, _ in ids])


def image_path(processed_dir: str | Path, image_id: str) -> Path:
    return Path(processed_dir) / "images" / f"{image_id}.png"


def mask_path(processed_dir: str | Path, image_id: str) -> Path:
    return Path(processed_dir) / "masks" / f"{image_id}.png"


def write_dataset_info(processed_dir: str | Path, rle_csv: str, rle_dialect: str) -> None:
    """Record which csv gave the masks and its RLE dialect (``convert``)."""
    info = {"rle_csv": rle_csv, "rle_dialect": rle_dialect}
    write_text_atomic(Path(processed_dir) / DATASET_INFO, json.dumps(info, indent=2) + "\n")


def output_dialect(configured: str | None, processed_dir: str | Path) -> str:
    """The RLE dialect outputs are written in: ``configured`` (``submit.dialect``) when set,
    else the training csv's (``dataset.json``), else ``relative`` (data converted before
    ``dataset.json`` existed)."""
    if configured:
        return configured
    path = Path(processed_dir) / DATASET_INFO
    return json.loads(path.read_text())["rle_dialect"] if path.is_file() else "relative"


def write_test_order(processed_dir: str | Path, ids: list[str]) -> None:
    write_csv(Path(processed_dir) / TEST_ORDER, ["ImageId"], ({"ImageId": i} for i in ids))


def read_test_order(processed_dir: str | Path) -> list[str] | None:
    """The sample submission's ImageId order recorded by ``convert`` (None when absent)."""
    path = Path(processed_dir) / TEST_ORDER
    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        return [r["ImageId"] for r in csv.DictReader(fh)]


def write_folds(path: str | Path, folds: dict[str, int], labels: dict[str, int]) -> None:
    """``ImageId,fold,has_mask`` sorted by ImageId."""
    write_csv(
        path,
        ("ImageId", "fold", "has_mask"),
        ({"ImageId": i, "fold": folds[i], "has_mask": labels[i]} for i in sorted(folds)),
    )


def read_folds(path: str | Path) -> dict[str, tuple[int, int]]:
    """ImageId -> (fold, has_mask) from ``folds.csv``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run `pneumoseg split` first)")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    check_unique_ids(rows, path)
    return {r["ImageId"]: (int(r["fold"]), int(r["has_mask"])) for r in rows}


def write_oof_models(out_dir: str | Path, models: dict[int, dict[str, Any]]) -> None:
    """Per fold: ``{"files": [...], "selection": {...}, "mlflow_run_id": ...}``."""
    text = json.dumps({str(k): v for k, v in models.items()}, indent=2, sort_keys=True)
    write_text_atomic(Path(out_dir) / "models.json", text + "\n")


def read_oof_models(out_dir: str | Path) -> dict[int, dict[str, Any]]:
    """What :func:`write_oof_models` wrote ({} for OOF sets written before it existed)."""
    path = Path(out_dir) / "models.json"
    if not path.is_file():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


MEMBERS_DIR = "members"  # <oof>/members/<name>/: the maps of ensemble member <name>


@dataclass
class OofSet:
    """The out-of-fold maps of one ``oof`` run (arrays memory-mapped)."""

    ids: list[tuple[str, int]]  # (ImageId, fold) per row
    probs: np.ndarray  # uint8 (N, S, S)
    masks: np.ndarray  # uint8 (N, S, S), 0/1
    cls: np.ndarray | None  # uint8 (N,) classifier probabilities, or None
    # ensemble.members: each further member's maps (and classifier values), same rows and size
    members: dict[str, np.ndarray] = field(default_factory=dict)
    member_cls: dict[str, np.ndarray | None] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.probs.shape[1])

    @property
    def folds(self) -> np.ndarray:
        return np.array([f for _, f in self.ids])


def open_oof_arrays(
    out_dir: str | Path, n: int, size: int, names: tuple[str, ...] = ("probs.npy", "masks.npy")
) -> list[np.ndarray]:
    """New memory-mapped arrays (``probs.npy`` and ``masks.npy``) of ``n`` maps of ``size`` x
    ``size``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = (n, size, size)
    return [new_memmap(out / name, shape) for name in names]


# Columns every learning_curves.csv has (blank where a run did not log them), so the plots of
# dvc.yaml always find their fields.
CURVE_FIELDS = (
    "fold",
    "epoch",
    "train_loss",
    "val_loss",
    "val_kaggle_dice",
    "observed_heldout_loss",
    "observed_heldout_kaggle_dice",
)


def write_learning_curves(
    out_dir: str | Path, models_dir: str | Path, folds: list[int]
) -> list[int]:
    """``learning_curves.csv`` in ``out_dir`` from each fold's ``history.csv`` (the fold
    record folder under ``models_dir``); returns the folds that have none (trained before the
    record held it)."""
    rows: list[dict[str, Any]] = []
    missing = []
    for k in folds:
        path = Path(models_dir) / f"fold{k}" / "history.csv"
        if not path.is_file():
            missing.append(k)
            continue
        with path.open(newline="") as fh:
            rows += [{"fold": k} | r for r in csv.DictReader(fh)]
    fields = list(CURVE_FIELDS)
    for row in rows:
        fields += [f for f in row if f not in fields]
    write_csv(Path(out_dir) / "learning_curves.csv", fields, rows)
    return missing


def write_oof_ids(out_dir: str | Path, ids: list[tuple[str, int]]) -> None:
    write_csv(
        Path(out_dir) / "ids.csv",
        ("ImageId", "fold", "row"),
        ({"ImageId": i, "fold": f, "row": k} for k, (i, f) in enumerate(ids)),
    )


def read_oof_ids(out_dir: str | Path) -> list[tuple[str, int]]:
    """(ImageId, fold) per row of ``<oof>/ids.csv`` in row order."""
    path = Path(out_dir) / "ids.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run `pneumoseg oof` first)")
    with path.open(newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["row"]))
    return [(r["ImageId"], int(r["fold"])) for r in rows]


def load_oof(out_dir: str | Path) -> OofSet:
    """The OOF set of ``out_dir`` (maps memory-mapped, rows checked against ``ids.csv``)."""
    out = Path(out_dir)
    ids = read_oof_ids(out)
    probs = np.load(out / "probs.npy", mmap_mode="r")
    masks = np.load(out / "masks.npy", mmap_mode="r")
    cls = np.load(out / "cls.npy") if (out / "cls.npy").is_file() else None
    if len(probs) != len(ids) or masks.shape != probs.shape:
        raise ValueError(
            f"{out}: probs {probs.shape}, masks {masks.shape} and {len(ids)} ids disagree; "
            "rerun `dvc repro -f -s oof`"
        )
    members: dict[str, np.ndarray] = {}
    member_cls: dict[str, np.ndarray | None] = {}
    for folder in sorted(p for p in (out / MEMBERS_DIR).glob("*") if p.is_dir()):
        members[folder.name] = np.load(folder / "probs.npy", mmap_mode="r")
        cls_file = folder / "cls.npy"
        member_cls[folder.name] = np.load(cls_file) if cls_file.is_file() else None
        if members[folder.name].shape != probs.shape:
            raise ValueError(
                f"{folder}/probs.npy: shape {members[folder.name].shape} differs from "
                f"{out}/probs.npy {probs.shape}; rerun `dvc repro -f -s oof`"
            )
    return OofSet(ids, probs, masks, cls, members, member_cls)


# A fold training's resume state (``<train.work_dir>/fold<k>/``, see
# pneumoseg.training.state) says in this small file which params, data and MLflow run it is
# of, so that other stages can tell a state left behind by a training that finished elsewhere.
RESUME_KEY_FILE = "run_key.json"


def write_resume_key(work: str | Path, run_key: str, mlflow_run_id: str | None) -> None:
    text = json.dumps({"run_key": run_key, "mlflow_run_id": mlflow_run_id}) + "\n"
    write_text_atomic(Path(work) / RESUME_KEY_FILE, text)


def resume_key(params_hash: object, data_hash: object, fold: object) -> str:
    """What a fold's resume state must have been made with to be resumed (``run_key`` in its
    key record): the training params, the data and the fold. A fine-tuning appends its own
    part (labels, starting model)."""
    return f"{params_hash}|{data_hash}|fold{fold}"


def stale_resume_state(work: str | Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The key record of the resume state in ``work`` when it is of the same params, data and
    fold as the finished model whose ``meta`` is given (the fold finished in another process,
    or DVC restored it from its cache): nothing will ever resume it. None otherwise."""
    path = Path(work) / RESUME_KEY_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    prefix = resume_key(meta.get("params_hash"), meta.get("data_hash"), meta.get("fold"))
    key = str(record.get("run_key", ""))
    return record if key == prefix or key.startswith(prefix + "|") else None
