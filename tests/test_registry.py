"""register -> models list/promote/rollback/show -> predict -> serve on a tiny trained project.

Two versions of the same fold ensemble are registered: v1 with the tuned post-processing and
v2 with a deliberately wide triplet (so its masks are non-empty and differ from v1's).
"""

from __future__ import annotations

import base64
import csv
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from engines import free_port
from pipeline_helpers import (
    BIN,
    DvcProject,
    cli,
    http_server,
)

pytestmark = pytest.mark.slow

TEST_DIR = "data/raw/demo/dicom-images-test"
IDENTIFYING_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def rle_by_id(path: Path) -> dict[str, str]:
    return {r["ImageId"]: r["EncodedPixels"] for r in rows(path)}


def store(project: Path) -> str:
    return f"sqlite:///{project / 'mlruns/mlflow.db'}"


def client(project: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store(project), registry_uri=store(project))


def download(project: Path, uri: str, dst: Path) -> Path:
    """Download a registered model of the project's store."""
    import mlflow

    from pneumoseg.tracking import using_tracking_uri

    with using_tracking_uri(store(project)):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


@pytest.fixture(scope="module", autouse=True)
def _local_tracking() -> Iterator[None]:
    """In-process commands must use the project's sqlite store, whatever the shell has set."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield


@pytest.fixture(scope="module")
def project(dvc_project: DvcProject, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny git + DVC project after `dvc repro` (version 1: the tuned ensemble,
    registered by the pipeline) plus version 2: the same fold models with a deliberately wide
    triplet."""
    project = dvc_project.copy(tmp_path_factory.mktemp("registry") / "p")
    assert "register" in dvc_project.ran
    # v2: the same fold models with a wide triplet at the 80th percentile of the OOF maps
    level = int(np.percentile(np.load(project / "oof/probs.npy"), 80))
    post = json.loads((project / "models/postprocess.json").read_text())
    post.update(top_threshold=level / 255, bottom_threshold=level / 255, min_area=0.0)
    post.update(min_component_area=0.0, cls_gate=None)
    wide = project / "models_wide"
    wide.mkdir()
    (wide / "postprocess.json").write_text(json.dumps(post))
    (wide / "folds").symlink_to(project / "models/folds", target_is_directory=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["thresholds"]["out"] = "models_wide/postprocess.json"
    params["submit"]["out"] = "submission/wide.csv"
    params["registry"]["out"] = "registered_wide.json"
    (project / "wide.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cli("-q", "--params", "wide.yaml", "register", cwd=project)
    cli("-q", "--params", "wide.yaml", "submit", cwd=project)
    return project


@pytest.fixture(scope="module")
def wide_predictions(project: Path) -> Path:
    """``predict`` of the demo test DICOMs with the wide models/ folder (no MLflow)."""
    out = project / "pred_wide"
    cli(
        "-q", "--params", "wide.yaml", "predict", "--model", "models_wide",
        "--input", TEST_DIR, "--out", str(out), cwd=project,
    )  # fmt: skip
    return out


def test_register_records_a_tagged_challenger(project: Path) -> None:
    from pneumoseg.params import digest, load_params, stage_values

    first = json.loads((project / "metrics/registered.json").read_text())
    second = json.loads((project / "registered_wide.json").read_text())
    assert (first["version"], second["version"]) == ("1", "2")
    assert first["model_uri"] == "models:/pneumoseg/1" and first["run_id"]
    assert first["champion"] is None and second["champion"] is None  # only promotion moves it
    assert second["aliases"] == ["challenger"]
    c = client(project)
    assert str(c.get_model_version_by_alias("pneumoseg", "challenger").version) == "2"
    tags = c.get_model_version("pneumoseg", "1").tags
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    folds = [json.loads((project / f"metrics/fold{k}.json").read_text()) for k in (0, 1)]
    assert tags["kaggle_dice"] == str(evaluation["kaggle_dice"])
    assert tags["kaggle_dice_cross_fitted"] == str(evaluation["kaggle_dice_cross_fitted"])
    assert tags["training_run_ids"] == ",".join(f["mlflow_run_id"] for f in folds)
    assert tags["data_hash"] == folds[0]["data_hash"]
    params = load_params(project / "params.yaml")
    training = sorted({f["params_hash"] for f in folds})
    own = stage_values(params, "register")
    assert own["submit.dialect"] is None  # null: the demo csv's dialect, as convert read it
    own["submit.dialect"] = json.loads((project / "data/processed/dataset.json").read_text())[
        "rle_dialect"
    ]
    assert own["submit.dialect"] == "relative"
    assert tags["params_hash"] == digest({"register": own, "training": training})
    assert tags["git_commit"] == (project / "init.sha").read_text()
    assert tags["register_run_id"] == first["run_id"]
    assert c.get_model_version("pneumoseg", "1").run_id == first["run_id"]
    # descriptions: what the model is and how to call it; what this version is, scores named
    about = c.get_registered_model("pneumoseg").description
    assert "models:/pneumoseg@champion" in about and "dicom_b64" in about
    version = c.get_model_version("pneumoseg", "1").description
    assert f"kaggle_dice_cross_fitted {evaluation['kaggle_dice_cross_fitted']:.4f}" in version
    assert "kaggle_dice is in-sample" in version and "relative RLE" in version


def test_registered_model_is_code_with_pinned_requirements(project: Path, tmp_path: Path) -> None:
    local = download(project, "models:/pneumoseg/1", tmp_path)
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / "pyfunc_model.py").is_file() and (local / "code/pneumoseg/dicom.py").is_file()
    assert not list(local.rglob("*.pkl"))  # nothing pickled
    assert set(pyfunc["artifacts"]) == {"fold0", "fold1", "params", "postprocess"}
    assert pyfunc["config"]["models"] == ["fold0", "fold1"]
    assert mlmodel["signature"]["inputs"] and mlmodel["signature"]["outputs"]
    assert (local / "input_example.json").is_file()
    reqs = (local / "requirements.txt").read_text().split()
    names = {r.split("==")[0] for r in reqs}
    assert all("==" in r for r in reqs)
    assert {"torch", "segmentation-models-pytorch", "timm", "pydicom", "mlflow"} <= names
    assert {"opencv-python-headless", "numpy"} <= names
    # a downloaded MLflow model folder works without the registry
    out = tmp_path / "pred"
    cli("-q", "predict", "--model", str(local), "--input", TEST_DIR, "--out", str(out),
        cwd=project)  # fmt: skip
    assert rle_by_id(out / "predictions.csv") == rle_by_id(project / "submission/submission.csv")


def test_models_list_and_show(project: Path) -> None:
    _, table, _ = cli("models", "list", cwd=project)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["version", "aliases", "created", "commit"]
    assert lines[1].split()[0] == "2" and "challenger" in lines[1]
    assert lines[2].split()[0] == "1"
    _, text, _ = cli("models", "list", "--json", cwd=project)
    listed = json.loads(text)
    assert [v["version"] for v in listed] == ["2", "1"]
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    assert listed[1]["kaggle_dice"] == pytest.approx(evaluation["kaggle_dice"])
    # the honest number first, with its interval, as evaluate wrote it
    untouched, (low, high) = (
        evaluation["kaggle_dice_untouched"],
        evaluation["kaggle_dice_untouched_ci95"],
    )
    assert listed[0]["kaggle_dice_untouched"] == pytest.approx(untouched)
    assert listed[0]["kaggle_dice_untouched_ci95"] == pytest.approx([low, high])
    assert lines[0].split()[4:7] == ["untouched", "(95%", "CI)"]
    assert f"{untouched:.4f} ({low:.4f}-{high:.4f})" in lines[1]
    _, text, _ = cli("models", "show", "1", "--json", cwd=project)
    info = json.loads(text)
    runs = [json.loads((project / f"metrics/fold{k}.json").read_text()) for k in (0, 1)]
    assert [r["run_id"] for r in info["lineage"]["training_runs"]] == [
        r["mlflow_run_id"] for r in runs
    ]
    assert info["lineage"]["data_hash"] and info["params"]["train.folds"] == "[0, 1]"
    assert info["metrics"]["kaggle_dice"] == pytest.approx(evaluation["kaggle_dice"])
    _, text, _ = cli("models", "show", "challenger", cwd=project)
    assert text.startswith("pneumoseg version 2") and "training run" in text


def test_champion_alias_moves_by_promote_and_rollback_and_predict_follows(
    project: Path, tmp_path: Path
) -> None:
    def predict(name: str, *model: str) -> tuple[int, dict[str, str], str]:
        code, _, err = cli(
            "-q", "predict", *model, "--input", TEST_DIR, "--out", str(tmp_path / name),
            cwd=project, check=False,
        )  # fmt: skip
        path = tmp_path / name / "predictions.csv"
        return code, (rle_by_id(path) if code == 0 else {}), err

    code, _, err = predict("none")
    assert code == 1 and "has no alias 'champion'" in err  # nothing promoted yet
    code, _, err = cli("models", "rollback", cwd=project, check=False)
    assert code == 1 and "no champion to roll back" in err

    cli("models", "promote", "1", cwd=project)
    code, first, _ = predict("v1")
    assert code == 0 and first == rle_by_id(project / "submission/submission.csv")
    _, out, _ = cli("models", "promote", "2", cwd=project)
    assert "1 -> 2" in out
    code, second, _ = predict("v2", "--model", "models:/pneumoseg@champion")
    assert code == 0 and second == rle_by_id(project / "submission/wide.csv")
    assert second != first and any(r != "-1" for r in second.values())
    assert json.loads((tmp_path / "v2/model.json").read_text())["version"] == "2"

    _, out, _ = cli("models", "rollback", cwd=project)
    assert "2 -> 1" in out
    assert predict("back")[1] == first
    code, _, err = cli("models", "rollback", cwd=project, check=False)  # second rollback
    assert code == 1 and "nothing to roll back to" in err
    model = client(project).get_registered_model("pneumoseg")
    assert str(model.aliases["champion"]) == "1"
    assert json.loads(model.tags["champion_history"]) == ["1"]


def test_rollback_walks_back_through_the_champion_history(project: Path) -> None:
    from pneumoseg import registry

    history = [str(client(project).get_registered_model("pneumoseg").aliases["champion"])]
    assert history == ["1"]  # where the previous test left it
    for version in ("2", "1", "2"):
        _, out, _ = cli("models", "promote", version, cwd=project)
        assert out.strip().endswith(f"-> {version}")
        history.append(version)
    tags = client(project).get_model_version("pneumoseg", "2").tags
    assert tags["previous_champion"] == "1" and tags["promoted_at"]
    for expected in ("1", "2", "1"):  # each rollback goes one champion further back
        _, out, _ = cli("models", "rollback", cwd=project)
        assert f"{history[-1]} -> {expected}" in out, out
        history.pop()
    code, _, err = cli("models", "rollback", cwd=project, check=False)
    assert code == 1 and "nothing to roll back to" in err and err.count("\n") == 1
    with pytest.raises(registry.RegistryError, match="has no version 9"):
        registry.promote(client(project), "pneumoseg", "9")
    code, _, err = cli("models", "show", "7", cwd=project, check=False)
    assert code == 1 and "model 'pneumoseg' has no version 7" in err


def test_auto_promote_needs_a_better_honest_score(project: Path) -> None:
    """The untouched score decides when both versions have one, else the cross-fitted one."""
    from pneumoseg import registry

    c = client(project)
    registry.promote(c, "pneumoseg", "1")
    promoted, why = registry.auto_promote(c, "pneumoseg", "2")  # same OOF maps: same score
    assert not promoted and "untouched dice" in why and "does not beat champion v1" in why
    saved = dict(c.get_model_version("pneumoseg", "2").tags)

    def tag(key: str, value: str) -> None:
        c.set_model_version_tag("pneumoseg", "2", key, value)

    try:
        tag("kaggle_dice_cross_fitted", "0.999")  # a better cross-fitted score alone: no
        assert not registry.auto_promote(c, "pneumoseg", "2")[0]
        tag("kaggle_dice_untouched", "None")  # no untouched score: the cross-fitted decides
        promoted, why = registry.auto_promote(c, "pneumoseg", "2")
        assert promoted and "cross-fitted dice 0.9990 beats champion v1" in why
        registry.promote(c, "pneumoseg", "1")
        tag("kaggle_dice_cross_fitted", saved["kaggle_dice_cross_fitted"])
        tag("kaggle_dice_untouched", "0.999")
        promoted, why = registry.auto_promote(c, "pneumoseg", "2")
        assert promoted and "untouched dice 0.9990 beats champion v1" in why
    finally:
        for key in ("kaggle_dice_cross_fitted", "kaggle_dice_untouched"):
            tag(key, saved[key])
    assert str(c.get_registered_model("pneumoseg").aliases["champion"]) == "2"


def test_predict_equals_submit(project: Path, wide_predictions: Path, tmp_path: Path) -> None:
    cli("-q", "predict", "--model", "models", "--input", TEST_DIR, "--out", str(tmp_path),
        cwd=project)  # fmt: skip
    assert rle_by_id(tmp_path / "predictions.csv") == rle_by_id(
        project / "submission/submission.csv"
    )
    wide = rle_by_id(wide_predictions / "predictions.csv")
    assert wide == rle_by_id(project / "submission/wide.csv")
    assert sum(r != "-1" for r in wide.values()) >= 2  # a real comparison, not all empty


def test_overlay_outlines_the_predicted_region(project: Path, wide_predictions: Path) -> None:
    from pneumoseg.plots import PRED_BGR

    positive = [r for r in rows(wide_predictions / "predictions.csv") if r["area_px"] != "0"]
    assert positive
    for r in positive:
        mask = cv2.imread(str(wide_predictions / f"masks/{r['ImageId']}.png"), 0) > 0
        picture = cv2.imread(str(wide_predictions / f"overlays/{r['ImageId']}.png"))
        assert picture.shape == (*mask.shape, 3)
        outline = np.all(picture == PRED_BGR, axis=2)
        assert outline.any() and mask[outline].all()  # the red outline lies on the prediction
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=0) > 0
        edge = mask & ~inner
        assert outline[edge].mean() > 0.5  # and follows its edge
        tinted = inner & ~outline
        if tinted.any():  # filled semi-transparently: red dominates inside
            b, _, red = (picture[tinted][:, i].astype(int) for i in range(3))
            assert (red > b).mean() > 0.9
        gray = picture[~mask]
        assert (gray[:, 0] == gray[:, 2]).all()  # outside: the plain radiograph


def _identifying_values(project: Path) -> set[str]:
    import pydicom

    values = set()
    for path in (project / "data/raw/demo").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        values |= {str(ds.get(t, "")) for t in IDENTIFYING_TAGS}
    return {v for v in values if len(v) >= 6}


def test_no_identifying_values_in_outputs_tags_or_artifacts(
    project: Path, wide_predictions: Path, tmp_path: Path
) -> None:
    import pneumoseg

    secrets = _identifying_values(project)
    assert any(v.startswith("DEMO^PATIENT") for v in secrets)

    def leaks(data: bytes) -> list[str]:
        return [v for v in secrets if v.encode() in data]

    for path in [*wide_predictions.rglob("*"), project / "metrics/registered.json"]:
        if path.is_file():
            assert not leaks(path.read_bytes()), path
    c = client(project)
    model = c.get_registered_model("pneumoseg")
    texts = [json.dumps(model.tags)]
    for v in ("1", "2"):
        mv = c.get_model_version("pneumoseg", v)
        run = c.get_run(mv.run_id)
        texts += [json.dumps(mv.tags), json.dumps(run.data.params), json.dumps(run.data.tags)]
    assert not leaks("\n".join(texts).encode())
    local = download(project, "models:/pneumoseg/2", tmp_path)
    package = Path(pneumoseg.__file__).resolve().parent
    for path in local.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(local)
        if rel.parts[:2] == ("code", "pneumoseg"):  # the package source, byte for byte
            assert path.read_bytes() == (package / Path(*rel.parts[2:])).read_bytes(), rel
        else:
            assert not leaks(path.read_bytes()), rel


def _request(url: str, payload: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null") if payload is not None else resp.status


def test_served_champion_answers_like_predict(
    project: Path, wide_predictions: Path, tmp_path: Path
) -> None:
    from pneumoseg import registry
    from pneumoseg.dicom import read_dicom

    registry.promote(client(project), "pneumoseg", "2")  # the wide version: non-empty masks
    expected = {r["ImageId"]: r for r in rows(wide_predictions / "predictions.csv")}
    image_id = next(i for i, r in expected.items() if r["area_px"] != "0")
    dicom = next((project / TEST_DIR).rglob(f"{image_id}.dcm"))
    port = free_port()
    e = {"MLFLOW_TRACKING_URI": store(project), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/pneumoseg@champion",
           "--host", "127.0.0.1", "--port", str(port), "--env-manager", "local"]  # fmt: skip
    with http_server(cmd, port, tmp_path / "serve.log", cwd=project, extra_env=e) as (base, _):
        payload = {
            "dataframe_split": {
                "columns": ["image_id", "dicom_b64"],
                "data": [[image_id, base64.b64encode(dicom.read_bytes()).decode()]],
            }
        }
        answer = _request(f"{base}/invocations", payload)["predictions"]
        assert [{k: str(v) for k, v in a.items()} for a in answer] == [expected[image_id]]
        array = {
            "dataframe_records": [{"image_id": "a", "image": read_dicom(dicom).image.tolist()}]
        }
        (got,) = _request(f"{base}/invocations", array)["predictions"]
        assert got["ImageId"] == "a" and got["area_px"] == int(expected[image_id]["area_px"])
        bad = {"dataframe_records": [{"image_id": "x", "dicom_b64": "aGVsbG8="}]}
        with pytest.raises(urllib.error.HTTPError) as err:
            _request(f"{base}/invocations", bad)
        assert err.value.code == 400 and "x: not a DICOM file" in err.value.read().decode()


def test_register_refuses_a_fold_without_its_training_run_until_upload(
    dvc_project: DvcProject, tmp_path: Path
) -> None:
    """A fold trained while MLflow was down has no run id in its model file: register stops with
    one line naming it (no version whose lineage says ""), and registers once
    `pneumoseg upload` has made the run, which the version then names."""
    import torch

    project = dvc_project.copy(tmp_path / "p")
    model = project / "models/folds/fold1/model.pt"
    blob = torch.load(model, weights_only=True)
    client(project).delete_run(blob["meta"]["mlflow_run_id"])  # the store never had it
    blob["meta"]["mlflow_run_id"] = None  # as training writes it when the store never answered
    torch.save(blob, model)
    record = project / "metrics/fold1.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | {"mlflow_run_id": None}))
    code, _, err = cli("-q", "register", cwd=project, check=False)
    assert code == 1 and "no MLflow run records the training of fold1" in err
    assert "pneumoseg upload" in err and err.count("\n") == 1
    cli("-q", "upload", "--fold", "1", cwd=project)
    uploaded = json.loads(record.read_text())["mlflow_run_id"]
    cli("-q", "register", cwd=project)
    registered = json.loads((project / "metrics/registered.json").read_text())
    assert registered["training_run_ids"]["fold1"] == uploaded
    version = client(project).get_model_version("pneumoseg", registered["version"])
    assert version.tags["training_run_fold1"] == uploaded
