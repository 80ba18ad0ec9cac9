"""``pneumoseg adversarial``: adversarial validation. Can a classifier tell the training images
from the test images? It sees the manifest fields (size, age, sex, view position, modality,
photometric interpretation, bits stored, transfer syntax) and image statistics of the
processed PNGs (intensity percentiles and an 8 x 8 thumbnail), and is scored by a stratified
5-fold cross-validated ROC AUC: 0.5 means the two sets look alike, near 1 that the folds do not
resemble the test set (their validation scores then say little about the test score). The
single features that separate them best are listed, so a user sees what differs.

The AUC, its bootstrap 95% interval and the feature table go to one MLflow run (``stage:
adversarial``) and to ``--out`` (default ``metrics/adversarial.json``); no image or per-image
value leaves the machine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.arrays import read_gray
from pneumoseg.artifacts import image_path, read_manifest
from pneumoseg.files import write_json
from pneumoseg.params import Params
from pneumoseg.progress import progress_bar

log = logging.getLogger("pneumoseg.adversarial")
NUMERIC = ("height", "width", "age", "bits_stored")
CATEGORICAL = ("sex", "view_position", "modality", "photometric", "transfer_syntax")
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
THUMB = 8
FOLDS = 5


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("nan")


def features(
    rows: list[dict[str, str]], processed_dir: str | Path, progress: bool = True
) -> tuple[np.ndarray, list[str]]:
    """One row of features per manifest row, and the feature names."""
    names = list(NUMERIC)
    levels = {f: sorted({r.get(f, "") for r in rows}) for f in CATEGORICAL}
    names += [f"{f}={v or '(empty)'}" for f in CATEGORICAL for v in levels[f]]
    names += [f"pixel_p{q}" for q in PERCENTILES] + ["pixel_mean", "pixel_std"]
    names += [f"thumb_{i}_{j}" for i in range(THUMB) for j in range(THUMB)]
    out = np.empty((len(rows), len(names)), np.float32)
    bar = progress_bar(rows, desc="adversarial: features", unit="img", bars_allowed=progress)
    for n, row in enumerate(bar):
        image = read_gray(image_path(processed_dir, row["ImageId"]))
        thumb = cv2_resize(image, THUMB)
        values = [_number(row.get(f, "")) for f in NUMERIC]
        values += [float(row.get(f, "") == v) for f in CATEGORICAL for v in levels[f]]
        values += [*np.percentile(image, PERCENTILES), image.mean(), image.std()]
        out[n] = [*values, *thumb.ravel()]
    return out, names


def cv2_resize(image: np.ndarray, side: int) -> np.ndarray:
    import cv2

    return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)


def cross_validated_auc(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, np.ndarray]:
    """ROC AUC of out-of-fold probabilities from a gradient-boosted classifier (stratified
    ``FOLDS``-fold), and those probabilities."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    probs = np.zeros(len(y))
    n_splits = min(FOLDS, int(y.sum()), int((1 - y).sum()))
    splits = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in splits.split(x, y):
        leaf = min(20, max(2, len(train) // 10))  # sklearn's 20 cannot split a small set
        model = HistGradientBoostingClassifier(
            max_iter=100, min_samples_leaf=leaf, random_state=seed
        )
        model.fit(x[train], y[train])
        probs[test] = model.predict_proba(x[test])[:, 1]
    return float(roc_auc_score(y, probs)), probs


def bootstrap_interval(
    y: np.ndarray, probs: np.ndarray, seed: int, n: int = 1000
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the AUC (resampled images, both classes kept)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        pick = rng.integers(0, len(y), len(y))
        if 0 < y[pick].sum() < len(pick):
            values.append(roc_auc_score(y[pick], probs[pick]))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def separating_features(
    x: np.ndarray, y: np.ndarray, names: list[str], top: int = 8
) -> list[dict[str, Any]]:
    """The single features that tell the sets apart best: each one's own AUC, folded so that
    0.5 is no signal and 1 a perfect split (constant features left out)."""
    from sklearn.metrics import roc_auc_score

    found = []
    for j, name in enumerate(names):
        column = np.nan_to_num(x[:, j], nan=-1.0)
        if np.ptp(column) == 0:
            continue
        auc = float(roc_auc_score(y, column))
        found.append({"feature": name, "auc": round(max(auc, 1 - auc), 4)})
    return sorted(found, key=lambda f: -f["auc"])[:top]


def run(
    params: Params, out: str | None = None, json_out: bool = False, progress: bool = True
) -> dict[str, Any]:
    """CLI entry: see the module docstring."""
    from pneumoseg.tracking import Tracker

    out = out or str(Path(params.train.metrics_dir) / "adversarial.json")
    manifest = read_manifest(params.data.processed_dir)
    rows = [r for r in manifest.values() if r["split"] in ("train", "test")]
    y = np.array([r["split"] == "test" for r in rows], dtype=int)
    if y.sum() < 2 or (1 - y).sum() < 2:
        raise ValueError(
            f"{params.data.processed_dir}/manifest.csv: adversarial validation needs at least 2 "
            f"train and 2 test images (found {int((1 - y).sum())} and {int(y.sum())})"
        )
    x, names = features(rows, params.data.processed_dir, progress)
    seed = params.split.seed
    auc, probs = cross_validated_auc(x, y, seed)
    low, high = bootstrap_interval(y, probs, seed)
    result = {
        "adversarial_auc": round(auc, 4),
        "adversarial_auc_ci95": [round(low, 4), round(high, 4)],
        "meaning": "cross-validated ROC AUC of a classifier telling test from training images: "
        "0.5 = alike, 1 = fully separable",
        "n_train": int((1 - y).sum()),
        "n_test": int(y.sum()),
        "classifier": f"sklearn HistGradientBoostingClassifier, stratified {FOLDS}-fold",
        "separating_features": separating_features(x, y, names),
    }
    tracker = Tracker(params.mlflow)
    result["mlflow_run_id"] = tracker.start("adversarial-validation", {"stage": "adversarial"})
    tracker.log_params({"classifier": result["classifier"], "n_features": len(names)})
    tracker.log_metrics(
        {"adversarial_auc": auc, "adversarial_auc_ci_low": low, "adversarial_auc_ci_high": high}
        | {"n_train": result["n_train"], "n_test": result["n_test"]},
        step=0,
    )
    tracker.log_dict(result, "adversarial.json")
    tracker.end()
    write_json(Path(out), result)
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        top = ", ".join(f"{f['feature']} {f['auc']:.2f}" for f in result["separating_features"][:3])
        print(
            f"adversarial: AUC {auc:.3f} (95% CI {low:.3f}-{high:.3f}; 0.5 = test looks like "
            f"train) over {result['n_train']} train and {result['n_test']} test images; most "
            f"separating single features: {top} -> {out}"
        )
    return result
