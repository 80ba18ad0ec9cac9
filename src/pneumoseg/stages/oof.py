"""Stage ``oof``: predict every training image with the model of the fold that did not train
on it. Writes ``<oof>/probs.npy`` (uint8 N x S x S, round(prob*255)), ``masks.npy`` (uint8 0/1,
the ground truth at S that all evaluation uses), ``ids.csv`` (ImageId, fold, row) and, for
models with a classification head, ``cls.npy``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneumoseg.data import read_gray
from pneumoseg.inference import Ensemble, fold_model_files, to_uint8_probs
from pneumoseg.params import Params
from pneumoseg.stages.split import read_folds


def read_oof_ids(path: str | Path) -> list[tuple[str, int]]:
    """(ImageId, fold) per row of ``ids.csv`` in row order."""
    with Path(path).open(newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["row"]))
    return [(r["ImageId"], int(r["fold"])) for r in rows]


def run(params: Params, progress: bool = True) -> Path:
    """CLI/DVC entry: out-of-fold probability maps for every fold in ``train.folds``."""
    cfg, S = params.oof, params.oof.size
    folds = read_folds(params.split.out)
    order = [(i, f) for i, (f, _) in sorted(folds.items()) if f in params.train.folds]
    order.sort(key=lambda x: (x[1], x[0]))
    missing = sorted(set(range(params.split.n_folds)) - set(params.train.folds))
    if missing:
        print(f"oof: folds {missing} are not trained; their images are left out of the OOF set")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(order)
    probs = np.lib.format.open_memmap(out / "probs.npy", mode="w+", dtype=np.uint8, shape=(n, S, S))
    masks = np.lib.format.open_memmap(out / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, S, S))
    cls_all: np.ndarray | None = None
    root = Path(params.data.processed_dir)
    bar = tqdm(total=n, desc="oof", unit="img", disable=not progress)
    row = 0
    for fold in params.train.folds:
        ids = [i for i, f in order if f == fold]
        ens = Ensemble(
            fold_model_files(params.train.models_dir, fold, cfg.checkpoints),
            tta_hflip=cfg.tta_hflip,
            batch_size=cfg.batch_size,
        )
        if ens.has_cls and cls_all is None:
            cls_all = np.zeros(n, dtype=np.uint8)
        images = ((i, read_gray(root / "images" / f"{i}.png", params.data.size)) for i in ids)
        for keys, p, cls in ens.predict_batches(images, S):
            probs[row : row + len(keys)] = to_uint8_probs(p)
            for j, image_id in enumerate(keys):
                masks[row + j] = read_gray(root / "masks" / f"{image_id}.png", S, mask=True) > 127
            if cls is not None and cls_all is not None:
                cls_all[row : row + len(keys)] = to_uint8_probs(cls)
            row += len(keys)
            bar.update(len(keys))
    bar.close()
    probs.flush()
    masks.flush()
    del probs, masks
    if cls_all is not None:
        np.save(out / "cls.npy", cls_all)
    with (out / "ids.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ImageId", "fold", "row"])
        writer.writerows((image_id, fold, k) for k, (image_id, fold) in enumerate(order))
    print(f"oof: {n} images from folds {params.train.folds} at {S}px -> {out}/probs.npy")
    return out
