"""What a packaged model needs at prediction time, shared by ``pneumoseg predict`` and the MLflow
pyfunc (:mod:`pneumoseg.serving.pyfunc_model`): the :class:`Bundle` (fold ensemble + flip TTA +
tuned post-processing + the decode settings it was trained with), the request format of the
served model and the per-image result row.

Both paths decode with :func:`pneumoseg.dicom.read_dicom` + :func:`~pneumoseg.dicom.prepare_image`
(as ``convert`` does) and predict with :func:`pneumoseg.inference.predict_masks` (as
``submit`` does), so they give the same numbers for the same image and model.

Only light modules are imported here; torch and mlflow are imported inside the functions.
"""

from __future__ import annotations

import base64
import binascii
import math
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoseg.artifacts import output_dialect

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.models import ModelSignature

    from pneumoseg.inference import Prediction
    from pneumoseg.params import ClaheParams, Params, ServingParams
    from pneumoseg.postprocess import PostProcess

FORMAT = "pneumoseg-pyfunc/1"
PARAMS_ARTIFACT = "params"  # resolved params.yaml of the registered ensemble
POSTPROCESS_ARTIFACT = "postprocess"  # models/postprocess.json
INPUT_COLUMNS = ("image_id", "dicom_b64", "image")
OUTPUT_COLUMNS = ("ImageId", "EncodedPixels", "has_pneumothorax", "area_px", "max_prob")
DIALECTS = ("relative", "absolute")


class RequestError(ValueError):
    """A request row that cannot be predicted; the message names the row's image_id."""


@dataclass
class Bundle:
    """A ready-to-use model: ensemble, post-processing and the decode settings of its data."""

    ensemble: Any  # pneumoseg.inference.Ensemble
    post: PostProcess
    size: int  # data.size: images are prepared exactly as `convert` wrote them
    clahe: ClaheParams
    dialect: str  # default RLE dialect of the outputs (submit.dialect)
    description: dict[str, Any]
    limits: ServingParams  # rows per request and pixels per image (serving.*)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """A native uint8 radiograph as the model sees it (CLAHE, area resize to ``size``)."""
        from pneumoseg.dicom import prepare_image

        return prepare_image(image, self.size, self.clahe)

    def predict(
        self, items: Iterable[tuple[str, np.ndarray, tuple[int, int], dict[str, Any]]]
    ) -> Iterator[Prediction]:
        """``(key, prepared image, (native h, w), meta)`` -> post-processed native-size masks."""
        from pneumoseg.inference import predict_masks

        return predict_masks(self.ensemble, self.post, items)


def build_bundle(
    files: list[Path],
    postprocess: Path,
    params: Params,
    description: dict[str, Any],
    device: str | None = None,
) -> Bundle:
    """Load the fold models and post-processing with the settings of ``params`` (on
    ``device``, default CUDA when there is one)."""
    from pneumoseg.inference import Ensemble
    from pneumoseg.postprocess import PostProcess

    oof = params.oof
    post = PostProcess.load(postprocess)
    ensemble = Ensemble.of(files, oof, device=device, weights=post.weights)
    return Bundle(
        ensemble=ensemble,
        post=post,
        size=params.data.size,
        clahe=params.data.clahe,
        dialect=output_dialect(params.submit.dialect, params.data.processed_dir),
        description=description,
        limits=params.serving,
    )


def bundle_from_artifacts(
    artifacts: Mapping[str, str], config: Mapping[str, Any], device: str | None = None
) -> Bundle:
    """The bundle of a logged pyfunc: ``artifacts`` name -> local path, ``config`` its
    ``model_config`` (``models``: the artifact names of the ensemble members, in order)."""
    import yaml

    if config.get("format") != FORMAT:
        raise ValueError(f"model_config: format {config.get('format')!r}, expected {FORMAT}")
    params = serving_params(yaml.safe_load(Path(artifacts[PARAMS_ARTIFACT]).read_text()) or {})
    files = [Path(artifacts[name]) for name in config["models"]]
    description = {
        "models": list(config["models"]),
        "tta_hflip": params.oof.tta_hflip,
        "tta_scales": params.oof.tta_scales,
        "tta_gammas": params.oof.tta_gammas,
        "size": params.data.size,
    }
    return build_bundle(files, Path(artifacts[POSTPROCESS_ARTIFACT]), params, description, device)


SERVING_KEYS = (
    *("data.size", "data.clahe", "oof.tta_hflip", "oof.tta_scales", "oof.tta_gammas"),
    *("oof.batch_size", "submit.dialect"),
    *("serving.max_rows", "serving.max_image_pixels"),
)


def serving_params(raw: Mapping[str, Any]) -> Params:
    """Params with the settings a packaged model needs (:data:`SERVING_KEYS`) read from its
    params artifact; other keys are ignored, so versions registered with an older schema (a
    whole params.yaml of their day) still load."""
    from pneumoseg.params import MISSING, Params, get_path, nest

    found = {k: get_path(raw, k) for k in SERVING_KEYS}
    return Params.model_validate(nest({k: v for k, v in found.items() if v is not MISSING}))


def result_row(pred: Prediction, dialect: str, image_id: str | None = None) -> dict[str, Any]:
    """The output row of one image (same columns for predictions.csv and the served model)."""
    from pneumoseg.rle import rle_encode

    area = int(np.count_nonzero(pred.mask))
    return {
        "ImageId": image_id if image_id is not None else pred.image_id,
        "EncodedPixels": rle_encode(pred.mask, dialect),
        "has_pneumothorax": int(area > 0),
        "area_px": area,
        "max_prob": round(pred.max_prob_u8 / 255.0, 6),
    }


# --------------------------------------------------------------------------------------------
# The served model's request format
# --------------------------------------------------------------------------------------------


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def decode_dicom_b64(
    text: str, image_id: str, max_pixels: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Base64 DICOM bytes -> (native uint8 image, non-identifying meta) via ``read_dicom``;
    refused unread when larger than an image of ``max_pixels`` can be (RGB, 16 bit, + 1 MiB)."""
    from pneumoseg.dicom import DicomReadError, read_dicom

    most = 6 * max_pixels + (1 << 20)
    if len(text) * 3 // 4 > most:
        raise RequestError(
            f"{image_id}: dicom_b64 holds {len(text) * 3 // 4 / 1e6:.1f} MB, more than an image "
            f"of serving.max_image_pixels ({max_pixels}) can need ({most / 1e6:.1f} MB)"
        )
    try:
        data = base64.b64decode("".join(str(text).split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{image_id}: dicom_b64 is not valid base64") from None
    with tempfile.TemporaryDirectory(prefix="pneumoseg-") as tmp:
        path = Path(tmp) / "input.dcm"
        path.write_bytes(data)
        try:
            dicom = read_dicom(path, max_pixels)
        except DicomReadError as exc:
            raise RequestError(f"{image_id}: {exc}") from None
    return dicom.image, dicom.meta


def decode_array(value: Any, image_id: str, max_pixels: int) -> np.ndarray:
    """A 2-D grayscale array (nested lists, 0..255) -> native uint8 image."""
    side = len(value) if isinstance(value, (list, np.ndarray)) else 0
    width = len(value[0]) if side and isinstance(value[0], (list, np.ndarray)) else 0
    if side * width > max_pixels:
        raise RequestError(
            f"{image_id}: image of {side} x {width} exceeds serving.max_image_pixels ({max_pixels})"
        )
    try:
        arr = np.asarray([np.asarray(r) for r in value] if isinstance(value, list) else value)
    except (TypeError, ValueError):
        raise RequestError(f"{image_id}: image must be a 2-D array of numbers") from None
    if arr.ndim != 2 or arr.dtype.kind not in "iuf" or min(arr.shape) < 1:
        raise RequestError(
            f"{image_id}: image must be a non-empty 2-D array of numbers, got shape {arr.shape}"
        )
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise RequestError(f"{image_id}: image values must be in 0..255")
    return np.ascontiguousarray(np.rint(arr).astype(np.uint8))


def decode_row(
    row: Mapping[str, Any], index: int, max_pixels: int
) -> tuple[str, np.ndarray, dict[str, Any]]:
    """One request row -> (ImageId, native uint8 image, meta); exactly one of ``dicom_b64`` and
    ``image`` must be given, of at most ``max_pixels``."""
    image_id = str(row["image_id"]) if _present(row.get("image_id")) else f"image{index}"
    has_dicom, has_image = _present(row.get("dicom_b64")), _is_array(row.get("image"))
    if has_dicom == has_image:
        raise RequestError(f"{image_id}: give exactly one of dicom_b64 and image")
    if has_dicom:
        image, meta = decode_dicom_b64(row["dicom_b64"], image_id, max_pixels)
        return image_id, image, meta
    return image_id, decode_array(row["image"], image_id, max_pixels), {}


def _is_array(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.size > 0
    return isinstance(value, (list, tuple)) and len(value) > 0


def predict_frame(bundle: Bundle, frame: pd.DataFrame, dialect: str | None = None) -> pd.DataFrame:
    """The served model: request rows -> one result row each (same order)."""
    import pandas as pd

    dialect = dialect or bundle.dialect
    if dialect not in DIALECTS:
        raise RequestError(f"dialect must be one of {DIALECTS}, got {dialect!r}")
    if len(frame) > bundle.limits.max_rows:
        raise RequestError(
            f"the request has {len(frame)} rows, more than serving.max_rows "
            f"({bundle.limits.max_rows}); send smaller batches"
        )
    unknown = sorted(set(frame.columns) - set(INPUT_COLUMNS))
    if unknown:
        raise RequestError(f"unknown input columns {unknown}; expected {list(INPUT_COLUMNS)}")
    ids: dict[str, str] = {}
    rows: dict[str, dict[str, Any]] = {}

    def items() -> Iterator[tuple[str, np.ndarray, tuple[int, int], dict[str, Any]]]:
        for i, row in enumerate(frame.to_dict(orient="records")):
            image_id, image, meta = decode_row(row, i, bundle.limits.max_image_pixels)
            key = str(i)  # ImageIds need not be unique in a request
            ids[key] = image_id
            yield key, bundle.prepare(image), (image.shape[0], image.shape[1]), meta

    for pred in bundle.predict(items()):
        rows[pred.image_id] = result_row(pred, dialect, ids[pred.image_id])
    ordered = [rows[str(i)] for i in range(len(frame))]
    return pd.DataFrame(ordered, columns=list(OUTPUT_COLUMNS))


def model_signature(dialect: str) -> ModelSignature:
    """Input: ``image_id`` + one of ``dicom_b64`` / ``image``; output: :data:`OUTPUT_COLUMNS`;
    params: ``dialect`` (RLE dialect of ``EncodedPixels``)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", "image_id"),
            ColSpec("string", "dicom_b64", required=False),
            ColSpec(Array(Array("long")), "image", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "ImageId"),
            ColSpec("string", "EncodedPixels"),
            ColSpec("long", "has_pneumothorax"),
            ColSpec("long", "area_px"),
            ColSpec("double", "max_prob"),
        ]
    )
    params = ParamSchema([ParamSpec("dialect", "string", dialect)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example(side: int = 32) -> pd.DataFrame:
    """A synthetic (non-patient) request: one small gradient image given as an array."""
    import pandas as pd

    yy, xx = np.mgrid[0:side, 0:side]
    image = ((40 + 150 * yy / side + 30 * np.sin(xx / 3.0)) % 256).astype(int)
    return pd.DataFrame({"image_id": ["example"], "image": [image.tolist()]})
