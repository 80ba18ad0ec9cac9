"""Packaging the fold ensemble + flip TTA + tuned post-processing as ONE MLflow pyfunc, defined
as code (:mod:`pneumoseg.serving.pyfunc_model`, nothing pickled): the fold model files,
``postprocess.json`` and the settings the served model needs are its artifacts, the
``pneumoseg`` package ships as ``code_paths``, requirements are pinned to the installed
versions."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pneumoseg.params import nest
from pneumoseg.redact import redact

log = logging.getLogger(__name__)


def package_digest(members: list[tuple[str, Path]], postprocess: Path, record: Any) -> str:
    """sha256 of what a registered version is made of and says: the member files (name,
    bytes), ``postprocess.json`` and ``record`` (settings and scores, JSON). Two versions with
    the same digest hold exactly the same model and record."""
    h = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode())
    for name, path in [*members, ("postprocess", postprocess)]:
        h.update(name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


# What the served model imports (pinned to the installed versions).
SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "segmentation-models-pytorch",
    "timm",
    "numpy",
    "pandas",
    "opencv-python-headless",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pillow",
    "pyyaml",
    "pydantic",
    "tqdm",
)


def pinned_requirements(names: tuple[str, ...] = SERVING_REQUIREMENTS) -> list[str]:
    """``name==version`` of each installed distribution (local version labels dropped)."""
    pins = []
    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            log.warning("register: %s is not installed; left out of the requirements", name)
            continue
        pins.append(f"{name}=={version.split('+')[0]}")
    return pins


MODEL_DESCRIPTION = """\
Pneumothorax segmentation of chest X-ray DICOMs (SIIM-ACR), trained and registered by pneumoseg:
a fold ensemble of segmentation-models-pytorch models with flip TTA and the tuned
post-processing (top threshold, bottom threshold, minimum area), as an MLflow pyfunc that ships
the pneumoseg code.

Input: a DataFrame, one row per image: `image_id` and either `dicom_b64` (a base64 DICOM file)
or `image` (uint8 grayscale rows at the native size, air dark). Output: `ImageId`,
`EncodedPixels` (RLE at the native size, -1 = empty), `has_pneumothorax`, `area_px`,
`max_prob`. The param `dialect` (`relative` or `absolute`) picks the RLE dialect.

Call it:
- `pneumoseg predict --model models:/{name}@champion --input <DICOM files or folders>`
- `mlflow.pyfunc.load_model("models:/{name}@champion").predict(frame)`
- `pneumoseg serve --model models:/{name}@champion`, then POST /invocations

Aliases: `champion` is the deployed version, `challenger` the latest registered;
`pneumoseg models promote <version>` and `pneumoseg models rollback` move them."""


def model_description(name: str) -> str:
    """The registered model's description: what it is, its columns, how to call it."""
    return MODEL_DESCRIPTION.format(name=name)


def version_description(
    settings: dict[str, Any], scores: dict[str, float], data_hash: str, commit: str
) -> str:
    """A version's description: folds, checkpoints, TTA and dialect (``settings``: the dotted
    keys it was packaged with), each OOF score with what it saw, the data and the commit."""
    shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    folds = ",".join(str(k) for k in settings["train.folds"])
    tta = "on" if settings["oof.tta_hflip"] else "off"
    for key in ("oof.tta_scales", "oof.tta_gammas"):  # the extra views, when there are any
        if settings.get(key):
            tta += f", {key.removeprefix('oof.tta_')} {settings[key]}"
    return (
        f"Folds {folds} ({settings['oof.checkpoints']} checkpoints, flip TTA {tta}), "
        f"{settings['submit.dialect']} RLE. Scores on the out-of-fold images: {shown} "
        "(kaggle_dice is in-sample: the thresholds were tuned on those images; cross_fitted: "
        "no threshold saw the image it scores; untouched: no decision saw them; "
        f"empty_baseline: the all-empty predictor). Data {data_hash}, git {commit[:12]}."
    )


def log_pyfunc(
    members: list[tuple[str, Path]],
    postprocess: Path,
    settings: dict[str, Any],
    dialect: str,
) -> Any:
    """Log the pyfunc into the active MLflow run; returns its ``ModelInfo``. ``members``:
    (artifact name, model file) in ensemble order; ``settings``: the dotted params keys the
    served model needs (decode size, CLAHE, TTA, batch size, dialect), stored nested like
    params.yaml."""
    import mlflow

    import pneumoseg
    from pneumoseg import serving

    package = Path(pneumoseg.__file__).resolve().parent
    code_file = Path(serving.__file__).resolve().parent / "pyfunc_model.py"
    with tempfile.TemporaryDirectory(prefix="pneumoseg-register-") as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(redact(nest(settings)), sort_keys=False))
        artifacts = {n: str(p.resolve()) for n, p in members}
        artifacts[serving.PARAMS_ARTIFACT] = str(params_file)
        artifacts[serving.POSTPROCESS_ARTIFACT] = str(postprocess.resolve())
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code_file),
            artifacts=artifacts,
            model_config={"format": serving.FORMAT, "models": [n for n, _ in members]},
            code_paths=[str(package)],
            signature=serving.model_signature(dialect),
            input_example=serving.input_example(),
            pip_requirements=pinned_requirements(),
            metadata={"pneumoseg_format": serving.FORMAT},
        )
