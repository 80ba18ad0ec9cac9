"""Model factory over segmentation-models-pytorch and the self-describing model file format.

A model file is ``torch.save({"format", "state_dict", "meta"})`` with only tensors and plain
values inside, so it loads with ``torch.load(weights_only=True)``; ``meta`` holds what is needed
to rebuild the network (arch, encoder, in_channels, ...) plus lineage (fold, params hash,
MLflow run id).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pneumoseg.files import atomic_file
from pneumoseg.layers import to_group_norm, widen_narrow_scse
from pneumoseg.params import ModelParams

log = logging.getLogger(__name__)
MODEL_FORMAT = "pneumoseg-model/1"
HUB_WEIGHTS = ("imagenet", "ssl", "swsl", "instagram", "advprop", "noisy-student")


class ModelError(ValueError):
    """A model that cannot be built or loaded; the message names the params key or file."""


def _load_local_encoder(model: nn.Module, path: Path, min_loaded: float) -> None:
    """Copy the tensors of a local weights file that fit the encoder (an RGB stem summed to
    one channel); report what was loaded and skipped, and refuse a file that fills less than
    ``min_loaded`` of the encoder's weights (``model.encoder_weights_min_loaded``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"model.encoder_weights: cannot load {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"model.encoder_weights: {path} holds no state dict")
    encoder = model.encoder  # type: ignore[attr-defined]
    own = encoder.state_dict()
    matched = {}
    for key, value in state.items():
        name = key.removeprefix("encoder.")
        if name not in own or not isinstance(value, torch.Tensor):
            continue
        if value.ndim == 4 and own[name].ndim == 4 and value.shape[1] > own[name].shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)  # RGB stem -> grayscale: sum colour kernels
        if value.shape == own[name].shape:
            matched[name] = value
    if not matched:
        raise ModelError(f"model.encoder_weights: no tensor of {path} matches encoder")
    total = sum(v.numel() for v in own.values())
    fraction = sum(v.numel() for v in matched.values()) / max(total, 1)
    missing = [name for name in own if name not in matched]
    unused = len(state) - len(matched)
    report = (
        f"model.encoder_weights: {path}: loaded {len(matched)} of the encoder's {len(own)} "
        f"tensors ({fraction:.1%} of its weights); {len(missing)} left at their initial values"
        + (f" (first: {missing[0]})" if missing else "")
        + f", {unused} tensors of the file unused"
    )
    if fraction < min_loaded:
        raise ModelError(
            f"{report}: below model.encoder_weights_min_loaded ({min_loaded:.0%}); is it this "
            "encoder's file? Lower the key to train from a partial file"
        )
    log.info("%s", report)
    encoder.load_state_dict(matched, strict=False)


def build_model(cfg: ModelParams) -> nn.Module:
    """Build an smp model with one output channel (and a classification head if asked)."""
    import segmentation_models_pytorch as smp

    weights = cfg.encoder_weights
    local = Path(weights) if weights and weights not in HUB_WEIGHTS else None
    if local is not None and not local.is_file():
        raise ModelError(f"model.encoder_weights: {weights} is neither a hub name nor a file")
    kwargs: dict[str, Any] = {}
    if cfg.classification_head:
        kwargs["aux_params"] = {"classes": 1, "dropout": 0.2}
    if cfg.decoder_channels:
        kwargs["decoder_channels"] = tuple(cfg.decoder_channels)
    if cfg.decoder_attention:
        kwargs["decoder_attention_type"] = cfg.decoder_attention
    try:
        with warnings.catch_warnings():  # smp's empty scSE squeeze, replaced below
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            model = smp.create_model(
                cfg.arch,
                encoder_name=cfg.encoder,
                encoder_weights=None if local else weights,
                in_channels=cfg.in_channels,
                classes=1,
                **kwargs,
            )
    except Exception as exc:
        hint = ""
        if weights in HUB_WEIGHTS and os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (HF_HUB_OFFLINE=1: use encoder_weights null or a local file)"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"model: cannot build {cfg.arch}/{cfg.encoder} weights={weights}: {first}{hint}"
        ) from None
    if local is not None:
        _load_local_encoder(model, local, cfg.encoder_weights_min_loaded)
    if cfg.decoder_attention:
        widen_narrow_scse(model)
    if cfg.norm == "group":  # after loading: BatchNorm's affine weights are not GroupNorm's
        to_group_norm(model)
    return model


def plain_smp_rebuilds(cfg: ModelParams) -> bool:
    """Whether ``smp.from_pretrained`` alone rebuilds this network: not with GroupNorm, nor
    with scSE on decoder blocks narrower than 16 channels (see ``widen_narrow_scse``)."""
    narrow = min(cfg.decoder_channels or [16]) < 16
    return cfg.norm != "group" and not (cfg.decoder_attention and narrow)


def forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mask logits (B,1,H,W) and classification logits (B,1) or None."""
    out = model(x)
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, None


def save_model_file(path: str | Path, state_dict: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write a model file (state dict on CPU + meta) atomically."""
    cpu = {k: v.detach().cpu() for k, v in state_dict.items()}
    with atomic_file(path, "wb") as fh:
        torch.save({"format": MODEL_FORMAT, "state_dict": cpu, "meta": meta}, fh)


def load_model_file(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from a model file's meta and load its weights (eval mode)."""
    state_dict, meta = read_model_file(path)
    cfg = ModelParams(
        arch=meta["arch"],
        encoder=meta["encoder"],
        encoder_weights=None,
        in_channels=meta["in_channels"],
        decoder_channels=meta.get("decoder_channels"),
        classification_head=meta.get("classification_head", False),
        decoder_attention=meta.get("decoder_attention"),
        norm="group" if meta.get("norm") == "group" else "batch",  # the others share weights
    )
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    return model.to(device).eval(), meta


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A model file's state dict (on the CPU) and meta."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path}: not a pneumoseg model file")
    return blob["state_dict"], blob["meta"]


def save_smp_folder(model_file: str | Path, folder: str | Path) -> None:
    """The model of ``model_file`` as segmentation-models-pytorch's own folder (``config.json``
    + ``model.safetensors``), which ``smp.from_pretrained(folder)`` opens without pneumoseg."""
    model, _ = load_model_file(model_file)  # a fresh CPU copy in the default memory format
    model.save_pretrained(str(folder))  # type: ignore[operator]


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of float tensors; integer buffers (BN counters) from the first."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(0).to(first.dtype)
        else:
            out[key] = first.clone()
    return out
