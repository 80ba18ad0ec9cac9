"""Switches on a built network: the normalisation for small batches (GroupNorm, frozen or
synchronised BatchNorm) and gradient checkpointing. timm's ``BatchNormAct2d`` (BatchNorm with
its activation fused) is handled like a plain ``BatchNorm2d``; its activation is kept."""

from __future__ import annotations

import math

from torch import nn

MAX_GROUPS = 32  # GroupNorm's usual count (Wu & He 2018)
MIN_CHANNELS_PER_GROUP = 4


class LayerError(ValueError):
    """A switch the network cannot take; the message names the params key."""


def group_count(channels: int) -> int:
    """Groups for ``channels``: the largest power of two <= 32 that divides them, halved while
    a group would hold fewer than 4 channels (16 channels: 4 groups)."""
    groups = math.gcd(channels, MAX_GROUPS)
    while groups > 1 and channels // groups < MIN_CHANNELS_PER_GROUP:
        groups //= 2
    return groups


def _group_norm_like(bn: nn.BatchNorm2d) -> nn.Module:
    from timm.layers import BatchNormAct2d, GroupNormAct

    channels = bn.num_features
    if isinstance(bn, BatchNormAct2d):
        gn = GroupNormAct(channels, group_count(channels), eps=bn.eps, apply_act=False)
        gn.act, gn.drop = bn.act, bn.drop  # the fused activation stays as it was
        return gn
    return nn.GroupNorm(group_count(channels), channels, eps=bn.eps)


def to_group_norm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm of ``model`` (in place) by a GroupNorm over the same channels;
    GroupNorm does not depend on the batch, so batches of 1-4 train like larger ones."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _group_norm_like(child))  # type: ignore[arg-type]
        else:
            to_group_norm(child)
    return model


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` (timm's fused ones included)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batch_norm_stats(model: nn.Module) -> None:
    """Put every BatchNorm in eval mode: the forward pass normalises with the running
    statistics and no longer updates them; the affine weights still train. Call after each
    ``model.train()``."""
    for bn in batch_norms(model):
        bn.eval()


def to_sync_batch_norm(model: nn.Module) -> nn.Module:
    """Every BatchNorm as a SyncBatchNorm (statistics over all DDP ranks), timm's own
    converter so that fused activations survive."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def widen_narrow_scse(model: nn.Module) -> int:
    """smp's scSE squeezes ``C`` channels to ``C // 16``: none below 16 channels (the demo's
    8-channel last decoder block). Give those blocks a one-channel squeeze; returns how many."""
    from segmentation_models_pytorch.base.modules import SCSEModule

    widened = 0
    for module in model.modules():
        if isinstance(module, SCSEModule):
            channels = module.sSE[0].in_channels
            if channels // 16 == 0:
                module.cSE = SCSEModule(channels, reduction=channels).cSE
                widened += 1
    return widened


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute the encoder's activations in the backward pass instead of keeping them (timm's
    ``set_grad_checkpointing``): less memory, one more encoder forward per step."""
    inner = getattr(getattr(model, "encoder", None), "model", None)
    setter = getattr(inner, "set_grad_checkpointing", None)
    if setter is None:
        raise LayerError(
            "train.grad_checkpointing: this encoder has no gradient checkpointing "
            "(timm tu-<name> encoders do); set it false"
        )
    setter(True)
