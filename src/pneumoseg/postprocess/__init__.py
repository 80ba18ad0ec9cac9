"""Triplet post-processing (SIIM-ACR 1st place) and fast threshold search on out-of-fold maps.

Inputs
------
``probs``: uint8 ``(N, S, S)`` probability maps stored as ``round(prob * 255)``; ``masks``:
``(N, S, S)`` ground truth, any non-zero pixel is positive; ``cls`` (optional): uint8 ``(N,)``
per-image classifier probabilities on the same 0..255 scale.

Threshold semantics (used everywhere in this module)
----------------------------------------------------
- A threshold ``t`` is a float in ``[0, 1]`` mapped to the uint8 level
  ``level(t) = int(round(t * 255))`` (Python ``round`` on the float64 product, i.e. ties go to
  the even level). Values outside ``[0, 1]`` raise ``ValueError``.
- A pixel is *above* ``t`` when ``prob_u8 > level(t)`` (strict), so comparisons happen on the
  stored uint8 scale: ``t = 0`` keeps every non-zero pixel, ``t = 1`` keeps nothing.
- The classifier gate predicts an empty mask when ``cls_u8 <= level(cls_gate)`` (the image is
  kept only when its classifier value is *above* the gate, same rule as pixels).

Area semantics
--------------
``min_area`` and ``min_component_area`` are in pixels at the *native* resolution (e.g. 2000 at
1024x1024). On an ``S x S`` map they become ``scale_area(a, S, native) =
ceil(a * S**2 / native**2)``, computed exactly with rationals (no float round-off). Because
pixel counts are integers, ``count < ceil(x)`` is the same as ``count < x``, so the ceiling is
the exact equivalent of comparing against the real-valued scaled area: no rounding bias in
either direction and the values transfer across training sizes.

The triplet rule (:func:`apply_triplet`, the reference semantics)
-----------------------------------------------------------------
1. gate (optional): ``cls_u8 <= level(cls_gate)`` -> empty;
2. if fewer than ``scale_area(min_area)`` pixels are above ``top_threshold`` -> empty;
3. otherwise mask = pixels above ``bottom_threshold``;
4. optional: drop 8-connected components of that mask with fewer than
   ``scale_area(min_component_area)`` pixels (0 = off); if nothing remains the mask is empty.

Scoring is the Kaggle mean per-image dice: ``2|P & G| / (|P| + |G|)``, and 1 when both are
empty. :class:`TripletScorer` reproduces :func:`kaggle_dice_naive` exactly (same integer counts,
same float formula) from per-image cumulative histograms.
"""

from pneumoseg.postprocess.blend import (
    WeightedMaps,
    WeightFit,
    blended_scorer,
    fit_weights,
    normalised,
    oof_members,
    weight_grid,
)
from pneumoseg.postprocess.oof import deployed_weights, fit_oof_weights, oof_scorer
from pneumoseg.postprocess.scorer import (
    N_LEVELS,
    TripletScorer,
    exhaustive_best,
    gate_levels,
    group_labels,
    kaggle_dice_naive,
)
from pneumoseg.postprocess.search import (
    SearchSettings,
    search_objective,
    search_space,
    select_triplets,
    suggest_triplet,
    triplet_from_params,
    tune,
)
from pneumoseg.postprocess.triplet import (
    PostProcess,
    Triplet,
    apply_triplet,
    grouped_dice,
    level,
    scale_area,
    score_grouped,
)

__all__ = [
    "N_LEVELS",
    "PostProcess",
    "SearchSettings",
    "Triplet",
    "TripletScorer",
    "WeightFit",
    "WeightedMaps",
    "apply_triplet",
    "blended_scorer",
    "deployed_weights",
    "exhaustive_best",
    "fit_oof_weights",
    "fit_weights",
    "gate_levels",
    "group_labels",
    "grouped_dice",
    "kaggle_dice_naive",
    "level",
    "normalised",
    "oof_members",
    "oof_scorer",
    "scale_area",
    "score_grouped",
    "search_objective",
    "search_space",
    "select_triplets",
    "suggest_triplet",
    "triplet_from_params",
    "tune",
    "weight_grid",
]
