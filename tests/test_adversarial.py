"""Adversarial validation (`pneumoseg adversarial`): a test set that looks different is found
and the feature that differs is named; the result is in MLflow and in a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from pipeline_helpers import Pipeline, cli

from pneumoseg.artifacts import image_path, read_manifest


def test_a_brighter_test_set_is_told_apart_and_the_pixels_are_named(
    tiny_pipeline: Pipeline, tmp_path: Path
) -> None:
    project = tiny_pipeline.copy(tmp_path / "p")
    processed = project / "data/processed"
    test_ids = [i for i, r in read_manifest(processed).items() if r["split"] == "test"]
    for image_id in test_ids:  # a scanner change: every test image 60 grey levels brighter
        path = image_path(processed, image_id)
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.int16)
        cv2.imwrite(str(path), np.clip(image + 60, 0, 255).astype(np.uint8))
    _, out, _ = cli("-q", "adversarial", "--json", cwd=project)
    result = json.loads(out)
    assert result["n_test"] == len(test_ids) == 6 and result["n_train"] == 24
    assert result["adversarial_auc"] >= 0.95
    low, high = result["adversarial_auc_ci95"]
    assert low <= result["adversarial_auc"] <= high
    top = result["separating_features"][0]
    assert top["feature"].startswith(("pixel_", "thumb_")) and top["auc"] >= 0.95
    assert json.loads((project / "metrics/adversarial.json").read_text()) == result
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["stage"] == "adversarial"
    assert abs(run.data.metrics["adversarial_auc"] - result["adversarial_auc"]) < 1e-4
