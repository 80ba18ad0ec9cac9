"""Tuning the triplet: the Optuna space (:func:`suggest_triplet`), and the search that
``thresholds`` deploys and ``evaluate`` cross-fits (:class:`SearchSettings`,
:func:`select_triplets`, :func:`tune`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from numbers import Real
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoseg.postprocess.scorer import TripletScorer, exhaustive_best, gate_levels
from pneumoseg.postprocess.triplet import PostProcess, Triplet, grouped_dice, level

if TYPE_CHECKING:
    import optuna


def search_space(space: Any, has_cls: bool) -> dict[str, Any]:
    """The :func:`suggest_triplet` space of a ``thresholds.space`` section (areas as integer
    ranges; the classifier gate only for models with a head)."""
    out: dict[str, Any] = {
        "top_threshold": tuple(space.top_threshold),
        "bottom_threshold": tuple(space.bottom_threshold),
        "min_area": (int(space.min_area[0]), int(space.min_area[1])),
    }
    if space.min_component_area is not None:
        lo, hi = space.min_component_area
        out["min_component_area"] = (int(lo), int(hi))
    if space.cls_gate is not None and has_cls:
        out["cls_gate"] = tuple(space.cls_gate)
    return out


_SPACE_KEYS = {"top_threshold", "bottom_threshold", "min_area", "min_component_area", "cls_gate"}
_REQUIRED = ("top_threshold", "bottom_threshold", "min_area")


def _range(space: Mapping[str, Any], key: str, integer: bool) -> tuple[Any, Any, int] | None:
    """``(lo, hi, step)`` of a space entry; a bare number is a fixed value (lo == hi)."""
    spec = space.get(key)
    if spec is None:
        return None
    if isinstance(spec, Real):
        spec = (spec, spec)
    spec = tuple(spec)
    if len(spec) not in (2, 3) or (len(spec) == 3 and not integer):
        raise ValueError(f"space[{key!r}] must be (lo, hi){' or (lo, hi, step)' * integer}")
    lo, hi, step = spec[0], spec[1], spec[2] if len(spec) == 3 else 1
    if integer:
        if any(float(v) != int(v) for v in (lo, hi, step)) or int(step) < 1 or lo < 0:
            raise ValueError(f"space[{key!r}] must be non-negative integers with step >= 1")
        lo, hi, step = int(lo), int(hi), int(step)
    else:
        lo, hi = float(lo), float(hi)
        for value in (lo, hi):
            level(value)  # validates [0, 1]
    if lo > hi:
        raise ValueError(f"space[{key!r}]: lo {lo} > hi {hi}")
    return lo, hi, step


def _build(
    space: Mapping[str, Any],
    prefix: str,
    get_float: Callable[[str, float, float], float],
    get_int: Callable[[str, int, int, int], int],
) -> Triplet:
    unknown = set(space) - _SPACE_KEYS
    missing = [k for k in _REQUIRED if space.get(k) is None]
    if unknown or missing:
        raise ValueError(f"space: unknown keys {sorted(unknown)}, missing keys {missing}")

    def flt(key: str) -> float | None:
        r = _range(space, key, integer=False)
        if r is None:
            return None
        return r[0] if r[0] == r[1] else get_float(prefix + key, r[0], r[1])

    def num(key: str) -> int:
        r = _range(space, key, integer=True)
        if r is None:
            return 0
        return r[0] if r[0] == r[1] else get_int(prefix + key, *r)

    top_lo = _range(space, "top_threshold", integer=False)[0]
    b_lo, b_hi, _ = _range(space, "bottom_threshold", integer=False)
    if b_lo > top_lo:
        raise ValueError(f"bottom_threshold lo {b_lo} > top_threshold lo {top_lo}: no room")
    top = flt("top_threshold")
    hi = min(b_hi, top)
    bottom = (
        b_lo if hi == b_lo else b_lo + get_float(prefix + "bottom_fraction", 0.0, 1.0) * (hi - b_lo)
    )
    return Triplet(
        top_threshold=top,
        min_area=float(num("min_area")),
        bottom_threshold=min(bottom, hi),
        min_component_area=float(num("min_component_area")),
        cls_gate=flt("cls_gate"),
    )


def suggest_triplet(trial: optuna.Trial, space: dict, prefix: str = "") -> Triplet:
    """Suggest a :class:`Triplet` from ``space`` (parameter names carry ``prefix``, e.g. "PA/").

    ``space`` keys: ``top_threshold``, ``bottom_threshold`` and ``cls_gate`` (optional) are
    ``(lo, hi)`` floats in [0, 1] (``suggest_float``, continuous; the scorer quantises them with
    :func:`level`); ``min_area`` and ``min_component_area`` (optional, 0 = off) are native pixels
    as ``(lo, hi)`` or ``(lo, hi, step)`` ints (``suggest_int``, linear, step 1 by default). A
    bare number fixes a value without suggesting it.

    ``bottom <= top`` is enforced by reparametrising: ``top`` is suggested, then
    ``{prefix}bottom_fraction`` in [0, 1] and ``bottom = lo + fraction * (min(hi, top) - lo)``,
    so every distribution is fixed (TPE models a stationary space) and no trial is wasted. This
    needs ``bottom lo <= top lo``. The bottom threshold is stored as the user attribute
    ``{prefix}bottom_threshold``; rebuild a triplet from ``study.best_params`` with
    :func:`triplet_from_params`.
    """

    def get_int(name: str, lo: int, hi: int, step: int) -> int:
        return trial.suggest_int(name, lo, hi, step=step)

    t = _build(space, prefix, trial.suggest_float, get_int)
    trial.set_user_attr(prefix + "bottom_threshold", t.bottom_threshold)
    return t


def triplet_from_params(params: Mapping[str, Any], space: dict, prefix: str = "") -> Triplet:
    """The :class:`Triplet` that :func:`suggest_triplet` built for these trial ``params``."""
    return _build(
        space, prefix, lambda name, lo, hi: params[name], lambda name, lo, hi, step: params[name]
    )


@dataclass(frozen=True)
class SearchSettings:
    """How the triplet is tuned (the ``thresholds.*`` keys): an Optuna TPE study of
    ``trials`` trials over ``space`` (seeded), and, with ``exhaustive``, the whole uint8 grid
    of top x bottom for each of ``areas`` and classifier ``gates``; the better one is kept
    (per group with ``group_by``)."""

    trials: int
    seed: int
    space: dict[str, Any]
    exhaustive: bool
    areas: tuple[float, ...]
    gates: tuple[float | None, ...]
    group_by: str | None = None

    @classmethod
    def of(cls, cfg: Any, has_cls: bool) -> SearchSettings:
        """From a ``thresholds`` params section, for OOF maps with/without classifier values."""
        space = search_space(cfg.space, has_cls)
        return cls(
            trials=int(cfg.trials),
            seed=int(cfg.seed),
            space=space,
            exhaustive=bool(cfg.exhaustive),
            areas=tuple(float(a) for a in cfg.exhaustive_areas),
            gates=tuple(gate_levels(space.get("cls_gate"))),
            group_by=cfg.group_by,
        )


def _subset(scorer: TripletScorer, subset: np.ndarray | None) -> np.ndarray:
    return np.arange(scorer.n) if subset is None else np.asarray(subset)


def search_objective(
    scorer: TripletScorer,
    space: dict[str, Any],
    groups: np.ndarray | None = None,
    subset: np.ndarray | None = None,
) -> Callable[[optuna.Trial], float]:
    """The study's objective: mean Kaggle dice over ``subset`` of the suggested triplet (one
    per group present in ``subset``, parameters prefixed ``<group>/``)."""
    idx = _subset(scorer, subset)
    names = None if groups is None else sorted({str(g) for g in np.asarray(groups)[idx]})

    def objective(trial: optuna.Trial) -> float:
        if names is None:
            return scorer.score(suggest_triplet(trial, space), idx)
        triplets = {g: suggest_triplet(trial, space, f"{g}/") for g in names}
        return float(grouped_dice(scorer, groups, triplets, idx).mean())

    return objective


def select_triplets(
    study: optuna.Study,
    scorer: TripletScorer,
    settings: SearchSettings,
    groups: np.ndarray | None = None,
    subset: np.ndarray | None = None,
    grids: dict[float | None, np.ndarray] | None = None,
) -> tuple[PostProcess, dict[str, Any]]:
    """The deployed choice on ``subset``: the study's best triplet or, when better, the grid's
    (per group: the score adds up over groups, so each group keeps its better one; the default
    triplet, for groups never seen, is the ungrouped grid optimum). Returns the post-processing
    and a report (``score``, ``selected``, ``optuna_best_score``, ``exhaustive`` ...).
    ``grids`` receives the ungrouped exhaustive score arrays per gate (see exhaustive_best)."""
    idx = _subset(scorer, subset)
    report: dict[str, Any] = {"optuna_best_score": float(study.best_value)}
    t0 = time.perf_counter()
    if groups is None:
        best = triplet_from_params(study.best_params, settings.space)
        post, score, selected = PostProcess(best), float(study.best_value), "optuna"
        report["optuna"] = asdict(best)
        if settings.exhaustive:
            ex_best, ex_score = exhaustive_best(scorer, settings.areas, settings.gates, idx, grids)
            report["exhaustive"] = asdict(ex_best) | {"score": ex_score}
            if ex_score > score:
                post, score, selected = PostProcess(ex_best), ex_score, "exhaustive"
    else:
        labels = np.asarray(groups)
        names = sorted({str(g) for g in labels[idx]})
        default = exhaustive_best(scorer, settings.areas, settings.gates, idx, grids)[0]
        chosen: dict[str, Triplet] = {}
        picked: dict[str, str] = {}
        candidates: dict[str, dict[str, Any]] = {}
        for g in names:
            mine = idx[labels[idx] == g]
            chosen[g] = triplet_from_params(study.best_params, settings.space, f"{g}/")
            picked[g] = "optuna"
            candidates[g] = {"optuna": asdict(chosen[g])}
            if settings.exhaustive:
                ex_best, ex_score = exhaustive_best(scorer, settings.areas, settings.gates, mine)
                candidates[g]["exhaustive"] = asdict(ex_best)
                if ex_score > scorer.score(chosen[g], mine):
                    chosen[g], picked[g] = ex_best, "exhaustive"
        post = PostProcess(default, settings.group_by, chosen)
        score = float(grouped_dice(scorer, labels, chosen, idx).mean())
        kinds = set(picked.values())
        selected = kinds.pop() if len(kinds) == 1 else "mixed"
        report["group_selected"] = picked
        report["group_candidates"] = candidates
        report["group_sizes"] = {g: int((labels[idx] == g).sum()) for g in names}
        if settings.exhaustive:
            report["exhaustive"] = {"score": score}
    if "exhaustive" in report:
        report["exhaustive"] |= {
            "areas": list(settings.areas),
            "gates": len(settings.gates),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    report |= {"score": score, "selected": selected}
    return post, report


def tune(
    scorer: TripletScorer,
    settings: SearchSettings,
    groups: np.ndarray | None = None,
    subset: np.ndarray | None = None,
    after_trial: Callable[[], None] | None = None,
) -> tuple[PostProcess, dict[str, Any]]:
    """The whole deployed search on ``subset`` with a fresh in-memory study (cross-fitting);
    ``after_trial`` is called after each trial (progress)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=settings.seed, multivariate=True),
    )
    callbacks = [lambda _study, _trial: after_trial()] if after_trial else None
    objective = search_objective(scorer, settings.space, groups, subset)
    study.optimize(objective, settings.trials, callbacks=callbacks)
    return select_triplets(study, scorer, settings, groups, subset)
