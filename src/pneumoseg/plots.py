"""PNG plots readable without a browser: learning curves and prediction overlays."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

TRUTH_BGR = (80, 220, 80)  # green outline: ground truth
PRED_BGR = (60, 60, 235)  # red fill/outline: prediction


def plot_history(history: list[dict[str, Any]], path: Path, fold: int | None = None) -> Path:
    """Losses, validation scores, learning rate and sample rate per epoch, parts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    panels = [
        (axes[0, 0], ["train_loss", "val_loss"], "loss"),
        (axes[0, 1], ["val_kaggle_dice", "val_dice_pos", "val_iou_pos", "val_empty_acc"], "score"),
        (axes[1, 0], ["lr"], "learning rate"),
        (axes[1, 1], ["sample_rate"], "positive fraction (sample rate)"),
    ]
    for ax, keys, title in panels:
        for key in keys:
            ax.plot(epochs, [r.get(key, np.nan) for r in history], marker="o", ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        starts = [
            r["epoch"] for i, r in enumerate(history) if i and r["part"] != history[i - 1]["part"]
        ]
        for x in starts:
            ax.axvline(x - 0.5, color="grey", ls="--", lw=0.8)
    axes[1, 0].set_yscale("log")
    fig.suptitle(f"fold {fold}" if fold is not None else "training")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def overlay(
    image: np.ndarray, pred: np.ndarray | None, truth: np.ndarray | None = None
) -> np.ndarray:
    """BGR uint8 picture: the radiograph, prediction filled semi-transparently and outlined in
    red, ground truth outlined in green."""
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if pred is not None and pred.any():
        p = pred.astype(np.uint8)
        tint = bgr.copy()
        tint[p > 0] = PRED_BGR
        bgr = cv2.addWeighted(tint, 0.35, bgr, 0.65, 0)
        contours, _ = cv2.findContours(p, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(bgr, contours, -1, PRED_BGR, 1)
    if truth is not None and truth.any():
        contours, _ = cv2.findContours(
            truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(bgr, contours, -1, TRUTH_BGR, 1)
    return bgr


def pixel_free_notice(path: Path, setting: str) -> Path:
    """A white PNG that says which setting kept the radiographs out (a declared output that
    must exist, without a pixel of patient data)."""
    canvas = np.full((60, 520), 255, np.uint8)
    text = f"radiograph overlays off ({setting})"
    cv2.putText(canvas, text, (10, 38), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 0, 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)
    return path


def save_overlay_grid(
    cases: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]],
    path: Path,
    cols: int = 4,
    labels: Sequence[str] | None = None,
) -> Path:
    """Grid of (image, truth, prediction, dice) overlays with the dice written on each tile,
    after the tile's label when given (e.g. its row of the per-image table)."""
    tiles = []
    for k, (image, truth, pred, dice) in enumerate(cases):
        tile = overlay(image, pred, truth)
        tile = cv2.resize(tile, (256, 256), interpolation=cv2.INTER_NEAREST)
        text = f"{labels[k]} dice {dice:.2f}" if labels else f"dice {dice:.2f}"
        cv2.putText(tile, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 0), 1)
        tiles.append(tile)
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack(rows))
    return path


def evaluation_plots(
    out: Path,
    scorer: Any,
    triplet: Any,
    dice: np.ndarray,
    gallery: int,
    case: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> list[Path]:
    """``evaluate``'s PNGs in ``out``: the OOF score against the bottom threshold (the tuned
    top threshold and min area kept), the per-image dice histogram, and the ``gallery`` worst
    false positives / negatives as overlays, each tile labelled ``#<row>``: its row of the
    per-image table (``evaluate.per_image``); ``case(i)`` gives OOF row ``i``'s (image, truth,
    prediction) at the map size; ``scorer`` a :class:`pneumoseg.postprocess.TripletScorer`."""
    import dataclasses

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    positive = scorer.gt > 0
    bottoms = np.arange(0, 256)
    scores = [
        scorer.score(dataclasses.replace(triplet, bottom_threshold=float(b) / 255)) for b in bottoms
    ]
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.plot(bottoms / 255, scores, label="tuned top/min_area, varying bottom")
    ax.axhline(scorer.empty_baseline(), color="grey", ls="--", label="all-empty baseline")
    ax.axvline(triplet.bottom_threshold, color="red", lw=0.8, label="tuned bottom")
    ax.set_xlabel("bottom threshold")
    ax.set_ylabel("Kaggle mean dice (OOF, in-sample)")
    ax.legend(fontsize=8)
    fig.savefig(out / "score_vs_bottom.png", dpi=90)
    plt.close(fig)
    written = [out / "score_vs_bottom.png"]

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.hist(
        [dice[positive], dice[~positive]],
        bins=20,
        range=(0, 1),
        stacked=True,
        label=["pneumothorax", "no pneumothorax"],
    )
    ax.set_xlabel("per-image dice")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.savefig(out / "dice_histogram.png", dpi=90)
    plt.close(fig)
    written.append(out / "dice_histogram.png")

    order = np.argsort(dice, kind="stable")
    fp = [i for i in order if not positive[i] and dice[i] == 0][:gallery]
    fn = [i for i in order if positive[i]][:gallery]
    for name, pick in (("worst_false_positives", fp), ("worst_false_negatives", fn)):
        if pick:
            cases = [(*case(int(i)), float(dice[i])) for i in pick]
            labels = [f"#{int(i)}" for i in pick]
            written.append(save_overlay_grid(cases, out / f"{name}.png", labels=labels))
    return written


def threshold_heatmap(
    grid: np.ndarray, areas: Sequence[float], selected: Any, path: Path, same_gate: bool = True
) -> dict[str, float] | None:
    """The threshold search's exhaustive grid as heatmaps, one panel per ``min_area``: bottom
    threshold across, top threshold up, colour = mean Kaggle dice on the OOF maps (in-sample);
    entries with bottom > top (never deployed) are blank, each panel's best is ringed. The
    ``selected`` triplet (the deployed one) is marked with a red cross when it lies on the grid
    (its ``min_area`` among ``areas``, no component filter, ``same_gate``: the grid was scored
    with its classifier gate). Returns the marked point (``area``,
    ``top``, ``bottom`` levels 0-255 and its ``score``) or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = np.arange(grid.shape[1])
    shown = np.where(levels[None, :] <= levels[:, None], grid, np.nan)  # bottom <= top
    cols = min(4, len(areas))
    rows = -(-len(areas) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 3.0 * rows + 0.5), squeeze=False, constrained_layout=True
    )
    extent = (-0.5 / 255, 255.5 / 255, -0.5 / 255, 255.5 / 255)
    top, bottom = round(selected.top_threshold * 255), round(selected.bottom_threshold * 255)
    on_grid = same_gate and selected.min_area in list(areas) and not selected.min_component_area
    marked = None
    image = None
    for a, ax in enumerate(axes.flat):
        if a >= len(areas):
            ax.axis("off")
            continue
        image = ax.imshow(
            shown[a], origin="lower", extent=extent, aspect="auto", cmap="viridis",
            vmin=np.nanmin(shown), vmax=np.nanmax(shown),
        )  # fmt: skip
        ti, bi = np.unravel_index(np.nanargmax(shown[a]), shown[a].shape)
        ax.plot(bi / 255, ti / 255, "o", mfc="none", mec="white", ms=9)
        ax.set_title(f"min_area {areas[a]:g} (best {shown[a][ti, bi]:.4f})", fontsize=8)
        ax.set_xlabel("bottom threshold", fontsize=8)
        ax.set_ylabel("top threshold", fontsize=8)
        if on_grid and float(areas[a]) == float(selected.min_area) and marked is None:
            ax.plot(bottom / 255, top / 255, "x", color="red", ms=11, mew=2.5)
            marked = {"area": float(areas[a]), "top": top, "bottom": bottom}
            marked["score"] = float(grid[a, top, bottom])
    if image is not None:
        fig.colorbar(image, ax=axes, label="Kaggle mean dice (OOF, in-sample)", shrink=0.8)
    where = "red cross" if marked else "not on this grid"
    fig.suptitle(
        f"deployed triplet: top {selected.top_threshold:.3f}, bottom "
        f"{selected.bottom_threshold:.3f}, min_area {selected.min_area:g} ({where})",
        fontsize=9,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return marked
