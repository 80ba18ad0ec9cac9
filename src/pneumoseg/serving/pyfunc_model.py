"""The registered pneumoseg model as an MLflow pyfunc, defined as code ("models from code").

``pneumoseg register`` logs this file with ``mlflow.pyfunc.log_model(python_model=<this file>)``;
the fold model files, ``postprocess.json`` and the resolved ``params.yaml`` are model artifacts,
the ``pneumoseg`` package ships as ``code_paths``. Nothing is pickled.

Input: a pandas DataFrame, one row per image, columns

* ``image_id`` (str): echoed as ``ImageId`` (e.g. the DICOM file stem);
* ``dicom_b64`` (str, optional): the bytes of a DICOM file, base64-encoded; decoded exactly as
  ``pneumoseg convert`` does (``read_dicom`` + ``prepare_image``);
* ``image`` (list of lists of int 0..255, optional): a display-ready grayscale radiograph at
  its native resolution (air dark), prepared the same way (CLAHE if the model used it, resize).

Each row gives exactly one of ``dicom_b64`` and ``image``. Params: ``dialect`` (``relative``,
the SIIM stage-1 RLE, or ``absolute``; by default the one the model was registered with: the
training csv's unless ``submit.dialect`` was set).

Output: a DataFrame, one row per input row in the same order: ``ImageId`` (str),
``EncodedPixels`` (RLE at the native resolution, ``-1`` = no pneumothorax), ``has_pneumothorax``
(0/1), ``area_px`` (predicted pixels at the native resolution), ``max_prob`` (highest ensemble
probability, 0..1 in steps of 1/255).

Served (``mlflow models serve -m models:/pneumoseg@champion --env-manager local``)::

    POST /invocations  {"dataframe_records": [{"image_id": "x", "dicom_b64": "<base64>"}],
                        "params": {"dialect": "absolute"}}
    -> {"predictions": [{"ImageId": "x", "EncodedPixels": "...", "has_pneumothorax": 1,
                         "area_px": 5120, "max_prob": 0.913725}]}

A row that cannot be decoded fails the request (HTTP 400) with a message naming its image_id.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel


class PneumosegModel(PythonModel):
    """Fold ensemble + flip TTA + tuned triplet post-processing on DICOMs or image arrays."""

    def load_context(self, context: Any) -> None:
        """Load the fold models and post-processing from the model's artifacts."""
        from pneumoseg.serving import bundle_from_artifacts

        self.bundle = bundle_from_artifacts(context.artifacts, context.model_config or {})

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One result row per request row (see the module docstring)."""
        from pneumoseg.serving import RequestError, predict_frame

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        dialect = (params or {}).get("dialect")
        try:
            return predict_frame(self.bundle, model_input, dialect)
        except RequestError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None


mlflow.models.set_model(PneumosegModel())
