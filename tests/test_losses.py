"""ComboLoss: each component against plain formulas on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from pneumoseg.losses import ComboLoss
from pneumoseg.params import LossParams

# two 2x2 images: the first has 2 positive pixels, the second is empty
LOGITS = [[0.0, 2.0, 0.5, -3.0], [-1.0, 0.5, -2.0, -0.2]]
TARGET = [[1, 1, 0, 0], [0, 0, 0, 0]]
CLS_LOGITS = [1.0, -0.5]


def _tensors() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor(LOGITS, dtype=torch.float32).reshape(2, 1, 2, 2)
    target = torch.tensor(TARGET, dtype=torch.float32).reshape(2, 1, 2, 2)
    return logits, target


def _flat() -> list[tuple[float, int]]:
    return [
        (x, y) for xs, ys in zip(LOGITS, TARGET, strict=True) for x, y in zip(xs, ys, strict=True)
    ]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _only(**weights: float) -> LossParams:
    base = {"bce": 0.0, "dice": 0.0, "focal": 0.0, "lovasz": 0.0, "cls": 0.0}
    return LossParams(**(base | weights))


def expected_bce() -> float:
    terms = [-(y * math.log(_sigmoid(x)) + (1 - y) * math.log(1 - _sigmoid(x))) for x, y in _flat()]
    return sum(terms) / len(terms)


def expected_dice() -> float:
    # smp binary DiceLoss: one soft dice over the whole batch, smooth=0, eps only clamps the
    # denominator: 1 - 2 * sum(p*y) / (sum(p) + sum(y))
    pairs = [(_sigmoid(x), y) for x, y in _flat()]
    inter = sum(p * y for p, y in pairs)
    return 1 - 2 * inter / (sum(p for p, _ in pairs) + sum(y for _, y in pairs))


def expected_focal() -> float:
    # smp FocalLoss default: gamma=2, alpha=None, mean over pixels of (1 - pt)^2 * -log(pt)
    terms = []
    for x, y in _flat():
        pt = _sigmoid(x) if y else 1 - _sigmoid(x)
        terms.append((1 - pt) ** 2 * -math.log(pt))
    return sum(terms) / len(terms)


def expected_lovasz() -> float:
    # Lovasz hinge per image: errors e = 1 - x*(2y-1) sorted descending, weighted by the
    # increments of the Jaccard loss along that order, relu'd, then averaged over images.
    # Image 1: errors 1.5 (neg), 1 (pos), -1 (pos), -2 (neg); |gt| = 2;
    #   Jaccard loss after k errors: 1/3, 2/3, 1, 1 -> increments 1/3, 1/3, 1/3, 0
    #   loss = 1.5/3 + 1/3 + 0 + 0 = 5/6
    # Image 2 (empty): errors 0, 1.5, -1, 0.8; Jaccard loss is 1 from the first error on,
    #   increments 1, 0, 0, 0 -> loss = max error = 1.5
    return (5 / 6 + 1.5) / 2


def expected_cls() -> float:
    # image labels: first image positive, second empty
    return (-math.log(_sigmoid(CLS_LOGITS[0])) - math.log(1 - _sigmoid(CLS_LOGITS[1]))) / 2


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bce", expected_bce),
        ("dice", expected_dice),
        ("focal", expected_focal),
        ("lovasz", expected_lovasz),
    ],
)
def test_component_matches_hand_value(name: str, expected) -> None:
    logits, target = _tensors()
    total, parts = ComboLoss(_only(**{name: 1.0}))(logits, target)
    assert set(parts) == {name}
    assert parts[name].item() == pytest.approx(expected(), rel=1e-5)
    assert total.item() == pytest.approx(expected(), rel=1e-5)


def test_cls_component_matches_hand_value() -> None:
    logits, target = _tensors()
    cls = torch.tensor(CLS_LOGITS).reshape(2, 1)
    _, parts = ComboLoss(_only(bce=1.0, cls=1.0))(logits, target, cls)
    assert set(parts) == {"bce", "cls"}
    assert parts["cls"].item() == pytest.approx(expected_cls(), rel=1e-5)


def test_dice_is_zero_for_an_all_empty_batch() -> None:
    logits, _ = _tensors()
    _, parts = ComboLoss(_only(dice=1.0))(logits, torch.zeros_like(logits))
    assert parts["dice"].item() == 0.0


def test_total_is_the_weighted_sum() -> None:
    logits, target = _tensors()
    cls = torch.tensor(CLS_LOGITS).reshape(2, 1)
    weights = LossParams(bce=3.0, dice=1.0, focal=4.0, lovasz=0.5, cls=2.0)
    total, parts = ComboLoss(weights)(logits, target, cls)
    assert set(parts) == {"bce", "dice", "focal", "lovasz", "cls"}
    hand = (
        3 * expected_bce()
        + expected_dice()
        + 4 * expected_focal()
        + 0.5 * expected_lovasz()
        + 2 * expected_cls()
    )
    assert total.item() == pytest.approx(hand, rel=1e-5)
    assert total.item() == pytest.approx(
        sum(getattr(weights, k) * v.item() for k, v in parts.items()), rel=1e-6
    )


def test_inactive_components_are_absent() -> None:
    logits, target = _tensors()
    loss = ComboLoss(LossParams(bce=0.0, dice=1.0))
    _, parts = loss(logits, target, torch.zeros(2, 1))  # cls logits ignored when cls == 0
    assert set(parts) == {"dice"}
    assert set(loss.components) == {"dice"}


def test_cls_weight_without_cls_logits_raises() -> None:
    logits, target = _tensors()
    with pytest.raises(ValueError, match="cls"):
        ComboLoss(LossParams(cls=1.0))(logits, target)


def test_gradients_flow_and_parts_are_detached() -> None:
    logits, target = _tensors()
    logits.requires_grad_(True)
    cls = torch.tensor(CLS_LOGITS).reshape(2, 1).requires_grad_(True)
    total, parts = ComboLoss(LossParams(bce=1, dice=1, focal=1, lovasz=1, cls=1))(
        logits, target, cls
    )
    total.backward()
    assert logits.grad is not None and cls.grad is not None
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert cls.grad.abs().sum() > 0
    assert all(not v.requires_grad for v in parts.values())
