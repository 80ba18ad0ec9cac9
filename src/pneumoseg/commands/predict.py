"""``pneumoseg predict``: DICOM files or folders -> predictions with a registered or local model.

``--model`` is ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (default
``models:/<mlflow.registered_model>@champion``), a ``runs:/`` or other MLflow artifact URI, a
local MLflow model folder (with ``MLmodel``) or a ``models/`` folder without MLflow
(``folds/fold<k>/model.pt`` + ``postprocess.json``, used with the current params).

DICOMs are decoded as ``convert`` does (``read_dicom`` + ``prepare_image`` with the model's
``data.size`` / ``data.clahe``) and predicted as ``submit`` does (same ensemble, TTA and
post-processing), streamed in batches. Writes to ``--out``:

* ``predictions.csv``: ImageId (the file name without ``.dcm``), EncodedPixels
  (``submit.dialect``, else the model's; ``-1`` = empty), has_pneumothorax (0/1), area_px
  (native pixels), max_prob;
* ``masks/<ImageId>.png`` (0/255, native resolution) and ``overlays/<ImageId>.png`` (the
  radiograph with the prediction filled semi-transparently and outlined);
* ``failures.csv`` (file name, reason) for unreadable inputs; ``model.json`` (what was used).
"""

from __future__ import annotations

import csv
import logging
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumoseg.files import staged_dir, write_json
from pneumoseg.params import Params

if TYPE_CHECKING:
    import numpy as np

    from pneumoseg.serving import Bundle

log = logging.getLogger(__name__)

FIELDS = ("ImageId", "EncodedPixels", "has_pneumothorax", "area_px", "max_prob")
OUTPUTS = {"predictions.csv", "failures.csv", "model.json", "masks", "overlays"}


class PredictError(RuntimeError):
    """A model or input problem that stops ``predict``; one line for the user."""


def _mlflow_folder(folder: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """(artifact name -> absolute path, model_config) of an unpacked pneumoseg pyfunc."""
    import yaml

    conf = (yaml.safe_load((folder / "MLmodel").read_text()) or {}).get("flavors", {})
    pyfunc = conf.get("python_function") or {}
    config = pyfunc.get("config") or {}
    artifacts = {
        name: str(folder / entry["path"]) for name, entry in (pyfunc.get("artifacts") or {}).items()
    }
    if not artifacts or "models" not in config:
        raise PredictError(f"{folder}: an MLflow model, but not a pneumoseg model")
    return artifacts, config


def load_model(params: Params, model: str | None, device: str | None = None) -> Bundle:
    """Resolve ``--model`` (see the module docstring) into a ready :class:`Bundle` on
    ``device`` (``--device``; default CUDA when there is one)."""
    from pneumoseg.inference import ensemble_members
    from pneumoseg.models import ModelError
    from pneumoseg.registry import default_model, download_model, is_model_uri
    from pneumoseg.serving import build_bundle, bundle_from_artifacts

    model = model or default_model(params)
    try:
        if is_model_uri(model):
            with tempfile.TemporaryDirectory(prefix="pneumoseg-model-") as tmp:
                folder, info = download_model(params, model, Path(tmp))
                bundle = bundle_from_artifacts(*_mlflow_folder(folder), device)
            bundle.description = {**info, **bundle.description}
            return bundle
        folder = Path(model)
        if not folder.is_dir():
            raise FileNotFoundError(f"--model {model}: no such folder")
        if (folder / "MLmodel").is_file():
            bundle = bundle_from_artifacts(*_mlflow_folder(folder), device)
            bundle.description = {"model": str(folder), **bundle.description}
            return bundle
        post = folder / "postprocess.json"
        if not (folder / "folds").is_dir() or not post.is_file():
            raise PredictError(
                f"--model {model}: neither an MLflow model folder (MLmodel) nor a models/ "
                "folder (folds/fold<k>/model.pt + postprocess.json)"
            )
        members = ensemble_members(
            folder / "folds",
            params.train.folds,
            params.oof.checkpoints,
            params.ensemble.members,
            params.pseudo_label.folds,
        )
        files = [f for _, f in members]
        description = {"model": str(folder), "files": [str(f) for f in files]}
        return build_bundle(files, post, params, description, device)
    except ModelError as exc:
        raise PredictError(f"--model {model}: {exc}") from None


def find_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """DICOM files (folders searched recursively, by content: any name), sorted by ImageId;
    plus (name, reason) of inputs that cannot be used (missing, duplicate ImageId). The files
    of a folder that are not DICOM are counted in one log line."""
    from pneumoseg.dicom import describe_others, find_dicom_files, image_id_of

    found: dict[str, Path] = {}
    failures: list[tuple[str, str]] = []
    candidates: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            dicoms, others = find_dicom_files(path)
            candidates += dicoms
            if others:
                log.info("predict: %s", describe_others(others, path))
        elif path.is_file():
            candidates.append(path)
        else:
            failures.append((path.name or raw, "no such file or folder"))
    for path in candidates:
        image_id = image_id_of(path)
        if image_id in found:
            if found[image_id].resolve() != path.resolve():
                failures.append((path.name, f"duplicate ImageId {image_id} (kept another)"))
            continue
        found[image_id] = path
    return [found[k] for k in sorted(found)], failures


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def run(
    params: Params,
    progress: bool = True,
    model: str | None = None,
    inputs: list[str] | None = None,
    out: str = "predictions",
    device: str | None = None,
) -> dict[str, Any]:
    """CLI entry of ``pneumoseg predict``; returns a summary."""

    files, failures = find_inputs(list(inputs or []))
    for name, reason in failures:
        print(f"predict: skipped {name}: {reason}", file=sys.stderr)
    if not files:
        raise PredictError(f"no DICOM files found in {' '.join(inputs or [])}")
    root = Path(out)
    foreign = (
        sorted(p.name for p in root.glob("*") if p.name not in OUTPUTS) if root.is_dir() else []
    )
    if foreign or (root.exists() and not root.is_dir()):
        raise PredictError(
            f"--out {root} holds files predict did not write ({', '.join(foreign[:3]) or root}); "
            "give a new or empty folder (predict replaces the whole folder)"
        )
    bundle = load_model(params, model, device)
    with staged_dir(root, "predicting") as work:  # a kill leaves the previous folder whole
        dialect = params.submit.dialect or bundle.dialect  # set, else the model's
        summary = _predict_into(work, bundle, files, failures, dialect, progress)
    which = summary.get("model", "")
    if "version" in summary:
        which = f"{summary['name']} version {summary['version']} ({summary['model']})"
    n_failed, predicted = summary["n_failed"], summary["n_predicted"]
    print(
        f"predict: {predicted} images ({summary['n_positive']} with pneumothorax), "
        f"{n_failed} failed"
        + (f" (see {root / 'failures.csv'})" if n_failed else "")
        + f" with {which} -> {root}"
    )
    if predicted == 0:
        raise PredictError(f"no input could be read (see {root / 'failures.csv'})")
    return summary


def _predict_into(
    root: Path,
    bundle: Bundle,
    files: list[Path],
    failures: list[tuple[str, str]],
    dialect: str,
    progress: bool,
) -> dict[str, Any]:
    """Write predict's outputs for ``files`` into the empty folder ``root``; the summary."""
    import cv2
    from tqdm import tqdm

    from pneumoseg.dicom import DicomReadError, image_id_of, read_dicom
    from pneumoseg.plots import overlay
    from pneumoseg.progress import progress_bar
    from pneumoseg.serving import result_row

    (root / "masks").mkdir()
    (root / "overlays").mkdir()
    natives: dict[str, np.ndarray] = {}  # at most one batch of native images in memory
    bar = progress_bar(total=len(files), desc="predict", bars_allowed=progress)

    def items() -> Iterator[tuple[str, np.ndarray, tuple[int, int], dict[str, Any]]]:
        for path in files:
            try:
                dicom = read_dicom(path)
            except DicomReadError as exc:
                failures.append((path.name, str(exc)))
                tqdm.write(f"predict: skipped {path.name}: {exc}", file=sys.stderr)
                bar.update(1)
                continue
            image_id = image_id_of(path)
            natives[image_id] = dicom.image
            yield image_id, bundle.prepare(dicom.image), (dicom.height, dicom.width), dicom.meta

    def write_pngs(image_id: str, image: np.ndarray, mask: np.ndarray) -> None:
        name = f"{image_id}.png"
        ok = cv2.imwrite(str(root / "masks" / name), mask * 255)
        ok &= cv2.imwrite(str(root / "overlays" / name), overlay(image, mask))
        if not ok:
            raise OSError(f"{root}: cannot write the PNGs of {image_id}")

    positive = predicted = 0
    writes: list[Future[None]] = []  # the PNGs are encoded and written while the model runs
    with (root / "predictions.csv").open("w", newline="") as fh, ThreadPoolExecutor(1) as pool:
        writer = csv.DictWriter(fh, fieldnames=list(FIELDS))
        writer.writeheader()
        for pred in bundle.predict(items()):
            row = result_row(pred, dialect)
            writer.writerow(row)
            positive += row["has_pneumothorax"]
            predicted += 1
            image = natives.pop(pred.image_id)
            writes.append(pool.submit(write_pngs, pred.image_id, image, pred.mask))
            while writes and writes[0].done():
                writes.pop(0).result()  # a failed write stops predict here
            bar.update(1)
        for done in writes:
            done.result()
    bar.close()
    _write_csv(root / "failures.csv", ("path", "reason"), failures)
    summary = {
        **bundle.description,
        "dialect": dialect,
        "n_predicted": predicted,
        "n_positive": positive,
        "n_failed": len(failures),
    }
    write_json(root / "model.json", summary)
    return summary
