"""Fold-ensemble inference with flip TTA: the one prediction path used by oof, submit, predict
and serving. Inputs are display-ready uint8 radiographs (as written by ``convert``).

:func:`predict_masks` is what submit, ``pneumoseg predict`` and the served model call: the
ensemble's probabilities at the model's size are resized (bilinear) to each image's native
size and the tuned triplet is applied there, so masks have native-resolution edges.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch

from pneumoseg.data import to_tensor
from pneumoseg.models import ModelError, forward, load_model_file
from pneumoseg.params import MAIN, OofParams, finetuned_dir, member_dir
from pneumoseg.postprocess import PostProcess, apply_triplet, normalised

T = TypeVar("T")


def fold_model_files(
    models_dir: str | Path, fold: int, checkpoints: str = "final", finetuned: bool = False
) -> list[Path]:
    """The files of one fold: its final ``model.pt``, (``top_k``) its last part's top-k, or
    (``snapshots``) the snapshot of every restart cycle of its last snapshot part; with
    ``finetuned``, those of its fine-tuned model (``pseudo_label.folds``)."""
    root = Path(finetuned_dir(str(models_dir)) if finetuned else models_dir) / f"fold{fold}"
    if checkpoints == "final":
        path = root / "model.pt"
        if not path.is_file():
            raise ModelError(f"{path}: missing (train fold {fold} first)")
        return [path]
    folder = "checkpoints" if checkpoints == "top_k" else "snapshots"
    listing = root / f"{folder}.json"
    if not listing.is_file():
        how = "" if folder == "checkpoints" else " with train.snapshots and a cosine_restarts part"
        raise ModelError(f"{listing}: missing (train fold {fold}{how} first)")
    entries = json.loads(listing.read_text())
    last = max(e["part"] for e in entries)
    return [root / folder / e["path"] for e in entries if e["part"] == last]


def ensemble_members(
    models_dir: str | Path,
    folds: Iterable[int],
    checkpoints: str = "final",
    members: Iterable[str] = (),
    finetuned: Iterable[int] = (),
) -> list[tuple[str, Path]]:
    """(name, file) of every model of the ensemble, in fold order: ``fold<k>`` (or
    ``fold<k>_<j>`` for the top-k checkpoints of fold k; the fine-tuned model for the folds in
    ``finetuned``), then for each further ensemble member ``<member>-fold<k>`` (its files under
    ``<models_dir>/members/<member>/``)."""
    out = []
    folds, tuned = list(folds), set(finetuned)
    for member in [None, *members]:
        root = models_dir if member is None else member_dir(str(models_dir), member)
        prefix = "" if member is None else f"{member}-"
        for k in folds:
            files = fold_model_files(root, k, checkpoints, member is None and k in tuned)
            for j, path in enumerate(files):
                if not path.is_file():
                    raise ModelError(f"{path}: missing (train fold {k} first)")
                out.append(
                    (f"{prefix}fold{k}" if len(files) == 1 else f"{prefix}fold{k}_{j}", path)
                )
    return out


class Ensemble:
    """Averages sigmoid probabilities over models and (optionally) horizontal-flip TTA. On a
    CUDA device the models run in channels_last with float16 autocast (AMP), as in training;
    on the CPU in float32 (bit-for-bit reproducible).

    Models of several ensemble members (the ``member`` of each model file's meta) are averaged
    within each member at that member's size, resized (bilinear) to the size of the first
    file's member and combined with ``weights`` (member -> weight; None: equal weights), as
    ``thresholds`` combined their OOF maps."""

    def __init__(
        self,
        files: Iterable[str | Path],
        tta_hflip: bool = True,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        tta_scales: Iterable[float] = (),
        tta_gammas: Iterable[float] = (),
        weights: Mapping[str, float] | None = None,
    ) -> None:
        self.device = pick_device(device)
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ModelError("ensemble: no model files")
        self.cuda = self.device.type == "cuda"
        self.memory_format = torch.channels_last if self.cuda else torch.contiguous_format
        loaded = [load_model_file(f, self.device) for f in self.files]
        self.models = [m.to(memory_format=self.memory_format) for m, _ in loaded]
        self.metas = [meta for _, meta in loaded]
        self.groups: dict[str, list[int]] = {}  # member -> indices of its models
        for i, meta in enumerate(self.metas):
            self.groups.setdefault(str(meta.get("member") or MAIN), []).append(i)
        sizes = {name: {self.metas[i]["size"] for i in idx} for name, idx in self.groups.items()}
        channels = {m["in_channels"] for m in self.metas}
        uneven = {name: sorted(s) for name, s in sizes.items() if len(s) != 1}
        if uneven or len(channels) != 1:
            raise ModelError(f"ensemble: models disagree on size {uneven} or channels {channels}")
        self.sizes = {name: s.pop() for name, s in sizes.items()}  # each member's own size
        self.size = self.sizes[next(iter(self.groups))]  # the common size: the first member's
        self.weights = member_weights(list(self.groups), weights)
        self.in_channels = channels.pop()
        self.has_cls = all(m.get("classification_head") for m in self.metas)
        self.tta_hflip = tta_hflip
        self.tta_scales, self.tta_gammas = list(tta_scales), list(tta_gammas)
        self.batch_size = batch_size

    @classmethod
    def of(
        cls,
        files: Iterable[str | Path],
        oof: OofParams,
        device: str | torch.device | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> Ensemble:
        """The ensemble with the TTA and batch size of the ``oof`` section (what OOF, submit,
        predict and serving all use) and the member ``weights`` of ``postprocess.json``."""
        return cls(
            files,
            oof.tta_hflip,
            device,
            oof.batch_size,
            tta_scales=oof.tta_scales,
            tta_gammas=oof.tta_gammas,
            weights=weights,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "files": [str(f) for f in self.files],
            "size": self.size,
            "member_weights": self.weights,
            "tta_hflip": self.tta_hflip,
            "tta_scales": self.tta_scales,
            "tta_gammas": self.tta_gammas,
            "mlflow_run_ids": sorted({str(m.get("mlflow_run_id")) for m in self.metas}),
        }

    def views(
        self, images: list[np.ndarray], size: int
    ) -> Iterator[tuple[torch.Tensor, float, bool]]:
        """Every TTA view of a batch at ``size``: (input, scale, flipped). The plain view, each
        rescale and each gamma curve, each also flipped with ``tta_hflip``."""
        plain = [
            image
            if image.shape == (size, size)
            else cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            for image in images
        ]
        variants: list[tuple[list[np.ndarray], float]] = [(plain, 1.0)]
        variants += [(plain, scale) for scale in self.tta_scales]
        for gamma in self.tta_gammas:
            lut = (255.0 * (np.arange(256) / 255.0) ** gamma).round().astype(np.uint8)
            variants.append(([cv2.LUT(image, lut) for image in plain], 1.0))
        for batch, scale in variants:
            x = torch.stack([to_tensor(image, self.in_channels) for image in batch])
            if scale != 1.0:
                side = max(32, round(size * scale / 32) * 32)
                x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear")
            x = x.to(self.device, memory_format=self.memory_format)
            for flip in [False, True] if self.tta_hflip else [False]:
                yield (torch.flip(x, dims=[3]) if flip else x), scale, flip

    @torch.no_grad()
    def predict(
        self, images: list[np.ndarray], out_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Probability maps (B, out, out) float32 and classifier probabilities (B,) or None."""
        out_size = out_size or self.size
        probs = np.zeros((len(images), out_size, out_size), dtype=np.float32)
        cls_out = np.zeros(len(images), dtype=np.float32) if self.has_cls else None
        for member, indices in self.groups.items():
            p, c = self._predict_member(images, indices, self.sizes[member])
            if p.shape[-1] != out_size:
                p = np.stack(
                    [cv2.resize(m, (out_size, out_size), interpolation=cv2.INTER_LINEAR) for m in p]
                )
            weight = np.float32(self.weights[member])  # 1.0 for one member: exact
            probs += p * weight
            if cls_out is not None and c is not None:
                cls_out += c * weight
        return probs, cls_out

    def _predict_member(
        self, images: list[np.ndarray], indices: list[int], size: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The mean over one member's models and TTA views, at its ``size``."""
        probs = torch.zeros((len(images), 1, size, size), device=self.device)
        cls_sum = torch.zeros((len(images), 1), device=self.device)
        amp = torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda)
        n, views = 0, list(self.views(images, size))
        for model in (self.models[i] for i in indices):
            for x, scale, flip in views:
                with amp:
                    logits, cls = forward(model, x)
                p = torch.sigmoid(logits.float())
                if scale != 1.0:
                    p = torch.nn.functional.interpolate(p, size=probs.shape[-2:], mode="bilinear")
                probs += torch.flip(p, dims=[3]) if flip else p
                if cls is not None:
                    cls_sum += torch.sigmoid(cls.float())
                n += 1
        out = (probs / n)[:, 0].cpu().numpy().astype(np.float32)
        return out, (cls_sum / n)[:, 0].cpu().numpy() if self.has_cls else None

    def predict_batches(
        self, images: Iterable[tuple[Any, np.ndarray]], out_size: int | None = None
    ) -> Iterator[tuple[list[Any], np.ndarray, np.ndarray | None]]:
        """Stream ``(key, image)`` pairs through :meth:`predict` in batches (bounded memory)."""
        keys: list[Any] = []
        batch: list[np.ndarray] = []
        for key, image in images:
            keys.append(key)
            batch.append(image)
            if len(batch) == self.batch_size:
                yield (keys, *self.predict(batch, out_size))
                keys, batch = [], []
        if batch:
            yield (keys, *self.predict(batch, out_size))


def member_weights(members: list[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Each member's weight, summing to 1 (``None``: equal); a one-line error when the weights
    and the models' members differ."""
    if weights is None:
        return {name: 1 / len(members) for name in members}
    if set(weights) != set(members):
        raise ModelError(
            f"ensemble: member weights for {sorted(weights)} but models of {sorted(members)} "
            "(rerun `dvc repro thresholds` after changing ensemble.members)"
        )
    return normalised({name: weights[name] for name in members})


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` (``cpu``, ``cuda``, ``cuda:1``), or CUDA when there is one, else the CPU; a
    CUDA device that is not there is one line, not a deserialisation error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ModelError(f"device {device!r}: expected cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device}: no CUDA device here (use --device cpu)")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise ModelError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def to_uint8_probs(probs: np.ndarray) -> np.ndarray:
    """round(prob * 255) as uint8: the storage scale of all probability maps."""
    return np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)


@dataclass
class Prediction:
    """One post-processed image."""

    image_id: str
    mask: np.ndarray  # uint8 0/1 at native height x width
    max_prob_u8: int  # highest ensemble probability, 0..255
    cls_u8: int | None  # classifier probability 0..255 (models with a head)


def to_native(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float probability map resized (bilinear) to ``height`` x ``width``, as uint8 levels."""
    if probs.shape != (height, width):
        probs = cv2.resize(probs, (width, height), interpolation=cv2.INTER_LINEAR)
    return to_uint8_probs(probs)


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items`` produced by a background thread up to ``depth`` ahead, so decoding (pydicom,
    OpenCV: C code without the GIL) overlaps the model; the order is kept and an exception of
    the producer is raised here, at the item where it happened."""
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", exc))

    threading.Thread(target=produce, name="pneumoseg-prefetch", daemon=True).start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "error":
                raise value
            if kind == "done":
                return
            yield value
    finally:
        stop.set()


def predict_masks(
    ensemble: Ensemble,
    post: PostProcess,
    items: Iterable[tuple[str, np.ndarray, tuple[int, int], dict[str, Any]]],
) -> Iterator[Prediction]:
    """``(ImageId, prepared uint8 image, (native h, w), meta)`` -> post-processed native masks.

    The probabilities are resized to the native size and the image's triplet (its group's,
    see :class:`PostProcess`) is applied there; areas are native pixels, so no rescaling.
    ``items`` is consumed in a background thread (:func:`prefetched`)."""
    pending: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}

    def images() -> Iterator[tuple[str, np.ndarray]]:
        for image_id, image, native, meta in items:
            pending[image_id] = (native, meta)
            yield image_id, image

    ahead = prefetched(images(), 2 * ensemble.batch_size)  # the next batch decodes meanwhile
    for keys, probs, cls in ensemble.predict_batches(ahead):
        cls_u8 = to_uint8_probs(cls) if cls is not None else None
        for j, image_id in enumerate(keys):
            (h, w), meta = pending.pop(image_id)
            native = to_native(probs[j], h, w)
            c = int(cls_u8[j]) if cls_u8 is not None else None
            mask = apply_triplet(native, post.triplet(meta), w, c)
            yield Prediction(image_id, mask, int(native.max()), c)
