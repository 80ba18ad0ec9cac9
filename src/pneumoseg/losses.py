"""Combo loss for binary segmentation: weighted sum of smp losses plus an optional image-level BCE.

Notes on the smp 0.6 components (all for 1-channel logits ``(B, 1, H, W)``):

- ``bce``: :class:`smp.losses.SoftBCEWithLogitsLoss`, the mean over all pixels.
- ``dice``: :class:`smp.losses.DiceLoss` in binary mode sums over the whole *batch* (one soft
  dice per batch, not per image), ``1 - 2*sum(p*y) / max(sum p + sum y, eps)``; it is 0 for a
  batch without any positive pixel.
- ``focal``: :class:`smp.losses.FocalLoss` with ``gamma=2`` and no alpha weighting, the mean
  over all pixels of ``(1 - p_t)**2 * bce``.
- ``lovasz``: :class:`smp.losses.LovaszLoss` (Lovasz hinge on the logits), per image, averaged.
- ``jaccard``: :class:`smp.losses.JaccardLoss` in binary mode, ``1 - sum(p*y) / (sum p + sum y
  - sum(p*y))`` over the whole batch (0 for a batch without positive pixels, like dice).
- ``focal_reduced_threshold``: smp's reduced focal loss (pixels with ``p_t`` above the threshold
  are down-weighted by ``((1 - p_t) / threshold) ** gamma``; the others keep weight 1).
- ``label_smoothing`` ``s``: the bce targets become ``s`` and ``1 - s`` (smp's
  ``smooth_factor``); the other terms keep the 0/1 mask.
- ``cls``: BCE-with-logits of the classification head ``(B, 1)`` against ``mask non-empty``.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pneumoseg.params import LossParams

SEG_COMPONENTS = ("bce", "dice", "focal", "lovasz", "jaccard")


def _make_component(name: str, cfg: LossParams) -> nn.Module:
    if name == "bce":
        return smp.losses.SoftBCEWithLogitsLoss(smooth_factor=cfg.label_smoothing or None)
    if name == "dice":
        return smp.losses.DiceLoss(mode="binary", from_logits=True)
    if name == "focal":
        return smp.losses.FocalLoss(
            mode="binary", gamma=2.0, reduced_threshold=cfg.focal_reduced_threshold
        )
    if name == "lovasz":
        return smp.losses.LovaszLoss(mode="binary", per_image=True)
    if name == "jaccard":
        return smp.losses.JaccardLoss(mode="binary", from_logits=True)
    raise ValueError(f"unknown loss component {name!r}")


class ComboLoss(nn.Module):
    """``sum(w_i * loss_i)`` over the components whose weight in ``weights`` is > 0."""

    def __init__(self, weights: LossParams) -> None:
        super().__init__()
        self.weights: dict[str, float] = {
            name: float(getattr(weights, name))
            for name in (*SEG_COMPONENTS, "cls")
            if getattr(weights, name) > 0
        }
        self.components = nn.ModuleDict(
            {
                name: _make_component(name, weights)
                for name in SEG_COMPONENTS
                if name in self.weights
            }
        )

    @property
    def uses_cls(self) -> bool:
        """Whether the classification-head term is active (needs ``cls_logits``)."""
        return "cls" in self.weights

    def forward(
        self, logits: Tensor, target: Tensor, cls_logits: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and the detached, unweighted value of each active component.

        ``logits``/``target``: ``(B, 1, H, W)``, target 0/1; ``cls_logits``: ``(B, 1)``.
        """
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} != target {tuple(target.shape)}")
        if self.uses_cls and cls_logits is None:
            raise ValueError("loss.cls > 0 needs cls_logits (a model with a classification head)")
        target = target.to(logits.dtype)
        values: dict[str, Tensor] = {
            name: module(logits, target) for name, module in self.components.items()
        }
        if self.uses_cls and cls_logits is not None:
            label = (target.amax(dim=(-2, -1)) > 0).to(cls_logits.dtype).reshape(cls_logits.shape)
            values["cls"] = F.binary_cross_entropy_with_logits(cls_logits, label)
        total = logits.new_zeros((), dtype=torch.float32)
        for name, value in values.items():
            total = total + self.weights[name] * value
        return total, {name: value.detach() for name, value in values.items()}
