"""The OOF-reading layer of :mod:`pneumoseg.postprocess`: scorers and member weights of the
OOF set a project wrote (``oof/``), for the ``thresholds`` and ``evaluate`` stages. It sits on
top of the chain triplet < components < scorer < search < blend, and nothing below imports it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.artifacts import load_oof, native_widths, read_manifest
from pneumoseg.postprocess.blend import WeightFit, blended_scorer, fit_weights, oof_members
from pneumoseg.postprocess.components import file_fingerprint
from pneumoseg.postprocess.scorer import COMPONENTS_CACHE, TripletScorer
from pneumoseg.postprocess.search import SearchSettings


def oof_scorer(
    oof_dir: str | Path, processed_dir: str | Path, weights: Mapping[str, float] | None = None
) -> tuple[TripletScorer, list[tuple[str, int]], dict[str, dict[str, str]]]:
    """A scorer over the OOF maps of ``oof_dir`` (native widths from the manifest), the
    (ImageId, fold) of every row and the manifest. With ensemble members in the OOF set, the
    maps are their mean with ``weights`` (None: equal weights; see :mod:`.blend`)."""
    oof = load_oof(oof_dir)
    manifest = read_manifest(processed_dir)
    native = native_widths(oof.ids, manifest)
    if not oof.members:
        out = Path(oof_dir)
        key = file_fingerprint(out / "probs.npy", out / "masks.npy")
        cache = (Path(COMPONENTS_CACHE), key)
        scorer = TripletScorer(oof.probs, oof.masks, native, oof.cls, components_cache=cache)
        return scorer, oof.ids, manifest
    maps, cls = oof_members(oof)
    weights = weights or {name: 1.0 for name in maps}
    return blended_scorer(maps, oof.masks, native, cls, weights), oof.ids, manifest


def fit_oof_weights(
    oof_dir: str | Path,
    processed_dir: str | Path,
    thresholds: Any,
    step: float,
    subsets: Callable[[np.ndarray], Mapping[Any, np.ndarray | None]],
) -> dict[Any, WeightFit]:
    """:func:`fit_weights` on the OOF set of ``oof_dir`` with the triplet grid of the
    ``thresholds`` params section; ``subsets`` maps the rows' folds to the named subsets
    ({} without ensemble members)."""
    oof = load_oof(oof_dir)
    if not oof.members:
        return {}
    manifest = read_manifest(processed_dir)
    native = native_widths(oof.ids, manifest)
    maps, cls = oof_members(oof)
    settings = SearchSettings.of(thresholds, all(c is not None for c in cls.values()))
    return fit_weights(maps, oof.masks, native, cls, settings, step, subsets(oof.folds))


def deployed_weights(
    oof_dir: str | Path, processed_dir: str | Path, thresholds: Any, mode: str, step: float
) -> tuple[dict[str, float] | None, dict[str, Any]]:
    """The weights ``thresholds`` deploys (``mode`` fitted: the fit on all OOF images; equal:
    the plain mean; None without members) and ``{"member_weight_fit": report}`` (each grid
    candidate's score, each member alone, the equal mean) for ``postprocess.json``."""
    everything = {"all": None}
    fits = fit_oof_weights(oof_dir, processed_dir, thresholds, step, lambda _: everything)
    if not fits:
        return None, {}
    fit = fits["all"]
    names = list(fit.weights)
    weights = fit.weights if mode == "fitted" else {n: 1 / len(names) for n in names}
    report = {
        "mode": mode,
        "step": step,
        "score": fit.score if mode == "fitted" else fit.equal,
        "equal": fit.equal,
        "alone": {n: fit.alone(n) for n in names},
        "candidates": fit.candidates,
    }
    return weights, {"member_weight_fit": report}
