"""Training data path: loader throughput against a bare loop, the model step beside it, and the
peak memory of a training data process at N and 4N images.

    python bench/loader.py [--images 64] [--sizes 256 1024] [--workers 0 1 2] [--rounds 3]

Data: ``--images`` synthetic chest-like 1024 px processed PNGs with masks, written into a temp
project and turned into training arrays by the real ``write_arrays`` (sizes 256 and 1024).

Throughput (images per second, one epoch of every image, after a warm-up epoch, median of
``--rounds`` rounds in rotated order):
- ``pneumoseg``: the trainer's loader, ``SegDataset`` over the arrays with the train transform of
  the repo's ``params.yaml`` (``build_train_transform``), keys ``(index, seed)`` like the
  sample-rate sampler's, batch ``train.batch_size``, persistent workers;
- ``bare``: the same keys, transform, batch and workers over ``np.load(mmap_mode="r")`` of the
  same files, in a ten-line Dataset (what a user would write by hand);
- ``model step``: forward + backward + Adam step of the demo model (``train.model``) with the
  repo's loss on a batch in memory, channels_last, the torch threads of this process.
Targets: pneumoseg >= 0.9x bare with the same workers; 2 workers >= 1.7x one worker on 2 cores.

Memory (``--rss``, on by default): a fresh process per case iterates one epoch of the training
loader over N and 4N images at 1024 px and reports its peak RSS (``VmHWM``), and with 2
workers the largest worker's. The ``dict cache`` case keeps every decoded pair in a dict in the
process, as round 1's loader did with ``train.workers: 0``: what the arrays replaced.
Nothing is asserted; only figures and ratios from the same run are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _key, _value in {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from pneumoseg.arrays import write_arrays  # noqa: E402
from pneumoseg.augment import build_train_transform  # noqa: E402
from pneumoseg.data import SegDataset, to_tensor  # noqa: E402
from pneumoseg.params import Params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIDE = 1024
TARGET_BARE, TARGET_WORKERS = 0.9, 1.7


def repo_params() -> Params:
    return Params.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text()))


# ------------------------------------------------------------------------------------ data
def make_project(root: Path, n: int, seed: int = 2019) -> Path:
    """``n`` synthetic 1024 px processed PNGs + masks + manifest, and their arrays."""
    rng = np.random.default_rng(seed)
    images, masks = root / "processed/images", root / "processed/masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    body = 70.0 + 120.0 * np.exp(-((xx - 0.5) ** 2) / 0.09 - ((yy - 0.55) ** 2) / 0.15)
    rows = []
    for i in range(n):
        image = body + rng.normal(0.0, 6.0, body.shape)
        mask = np.zeros((SIDE, SIDE), np.uint8)
        if i % 4 == 0:
            centre = (int(rng.uniform(0.2, 0.8) * SIDE), int(rng.uniform(0.25, 0.7) * SIDE))
            cv2.ellipse(mask, centre, (60, 90), float(rng.uniform(0, 180)), 0, 360, 255, -1)
            image[mask > 0] -= 20.0
        image_id = f"bench.{i:05d}"
        cv2.imwrite(str(images / f"{image_id}.png"), np.clip(image, 0, 255).astype(np.uint8))
        cv2.imwrite(str(masks / f"{image_id}.png"), mask)
        rows.append(f"{image_id},train,{int(i % 4 == 0)},,{SIDE},{SIDE}\n")
    (root / "processed/manifest.csv").write_text(
        "ImageId,split,has_mask,mask_pixels,height,width\n" + "".join(rows)
    )
    write_arrays(root / "processed", root / "arrays", [256], progress=False)
    return root / "arrays"


class BareRows(Dataset):
    """What a user writes by hand: memmap rows, the same transform, tensors."""

    def __init__(self, arrays: Path, size: int, transform: Any) -> None:
        self.images = np.load(arrays / str(size) / "images.npy", mmap_mode="r")
        self.masks = np.load(arrays / str(size) / "masks.npy", mmap_mode="r")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, seed = key
        self.transform.set_random_seed(seed)
        out = self.transform(image=np.array(self.images[index]), mask=np.array(self.masks[index]))
        y = torch.from_numpy(out["mask"]).float().unsqueeze(0)
        return to_tensor(out["image"], 1), y, index


def loader(dataset: Dataset, keys: list[tuple[int, int]], batch: int, workers: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch, sampler=keys, num_workers=workers,
        persistent_workers=workers > 0,
    )  # fmt: skip


def epoch_seconds(dl: DataLoader) -> float:
    t = time.perf_counter()
    for _ in dl:
        pass
    return time.perf_counter() - t


# ------------------------------------------------------------------------------ throughput
def throughput(arrays: Path, n: int, sizes: list[int], workers: list[int], rounds: int) -> None:
    params = repo_params()
    cfg = params.train
    keys = [(i, int(s)) for i, s in enumerate(np.random.default_rng(0).integers(0, 2**31, n))]
    ids = (arrays / "ids.txt").read_text().split()
    print(f"throughput: {n} images per epoch, batch {cfg.batch_size}, median of {rounds} rounds")
    print(f" size  workers  pneumoseg img/s   bare img/s   ratio   (target >= {TARGET_BARE})")
    summary: dict[int, dict[int, float]] = {}
    for size in sizes:
        transform = build_train_transform(cfg.augment, size)
        loaders = {}
        for w in workers:
            ours = SegDataset(ids, arrays, size, cfg.model.in_channels, transform=transform)
            loaders[("pneumoseg", w)] = loader(ours, keys, cfg.batch_size, w)
            loaders[("bare", w)] = loader(
                BareRows(arrays, size, transform), keys, cfg.batch_size, w
            )
        for dl in loaders.values():
            epoch_seconds(dl)  # warm-up: worker start, page cache
        times: dict[tuple[str, int], list[float]] = {k: [] for k in loaders}
        order = list(loaders)
        for r in range(rounds):
            for k in order[r % len(order) :] + order[: r % len(order)]:
                times[k].append(epoch_seconds(loaders[k]))
        summary[size] = {}
        for w in workers:
            ours = n / statistics.median(times[("pneumoseg", w)])
            bare = n / statistics.median(times[("bare", w)])
            summary[size][w] = ours
            print(f" {size:4d}  {w:7d}  {ours:15.1f}  {bare:11.1f}  {ours / bare:6.2f}")
        del loaders
        step = model_step(params, size)
        print(f" {size:4d}  model step (batch {cfg.batch_size}): {step:.1f} img/s")
    if 1 in workers and 2 in workers:
        for size, rates in summary.items():
            print(
                f"{size} px: 2 workers / 1 worker = {rates[2] / rates[1]:.2f}x "
                f"(target >= {TARGET_WORKERS})"
            )


def model_step(params: Params, size: int, steps: int = 3) -> float:
    """Images per second of forward + backward + step of the demo model on a batch in memory."""
    from pneumoseg.losses import ComboLoss
    from pneumoseg.models import build_model, forward

    cfg = params.train
    torch.manual_seed(0)
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    loss_fn = ComboLoss(cfg.parts[0].loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(cfg.batch_size, cfg.model.in_channels, size, size)
    x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(cfg.batch_size, 1, size, size) > 0.9).float()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        optimizer.zero_grad()
        logits, _ = forward(model, x)
        loss, _ = loss_fn(logits, y)
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - t)
    return cfg.batch_size / statistics.median(times)


# ---------------------------------------------------------------------------------- memory
CHILD = """
import json, sys
import numpy as np
from torch.utils.data import DataLoader
sys.path.insert(0, {bench!r})
from loader import BareCache, repo_params
from pneumoseg.augment import build_train_transform
from pneumoseg.data import SegDataset
arrays, n, workers, kind = {arrays!r}, {n}, {workers}, {kind!r}
cfg = repo_params().train
ids = open(arrays + "/ids.txt").read().split()[:n]
transform = build_train_transform(cfg.augment, 1024)
ds = SegDataset(ids, arrays, 1024, 1, transform=transform)
if kind == "dict cache":
    ds = BareCache(ds)
keys = [(i, i) for i in range(n)]
dl = DataLoader(ds, batch_size=cfg.batch_size, sampler=keys, num_workers=workers,
                persistent_workers=workers > 0)
for _ in range(2):
    for _ in dl:
        pass
from pathlib import Path
def high_water(pid):  # VmHWM (Linux): ru_maxrss would carry the parent's peak across exec
    for line in Path(f"/proc/{{pid}}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
worker_peak = 0
if workers:  # the workers' own high-water marks, read while they live
    kids = [k for t in Path("/proc/self/task").iterdir()
            for k in (t / "children").read_text().split()]
    worker_peak = max(high_water(k) for k in kids)
print(json.dumps({{"peak": high_water("self"), "worker_peak": worker_peak}}))
"""


class BareCache(Dataset):
    """Round 1's ``train.workers: 0`` loader: every decoded pair kept in a dict."""

    def __init__(self, ds: SegDataset) -> None:
        self.ds, self.cache = ds, {}
        self.load = self.ds.load

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if index not in self.cache:
            self.cache[index] = self.ds.load(index)
        image, mask = self.cache[index]
        self.ds.transform.set_random_seed(seed)
        out = self.ds.transform(image=image, mask=mask)
        return to_tensor(out["image"], 1), torch.from_numpy(out["mask"]).float()[None], index


def memory(arrays: Path, n: int) -> None:
    print(f"\npeak RSS of one epoch x2 of the training loader at 1024 px, N = {n}, 4N = {4 * n}")
    print("  case                        N          4N     4N - N")
    for kind, workers in (("arrays", 0), ("arrays", 2), ("dict cache", 0)):
        peaks = []
        for count in (n, 4 * n):
            code = CHILD.format(
                bench=str(Path(__file__).parent), arrays=str(arrays), n=count,
                workers=workers, kind=kind,
            )  # fmt: skip
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
        label = f"{kind}, {workers} workers"
        a, b = (p["peak"] / 2**20 for p in peaks)
        print(f"  {label:22s} {a:7.0f} MB  {b:7.0f} MB  {b - a:+6.0f} MB   (process)")
        if workers:
            a, b = (p["worker_peak"] / 2**20 for p in peaks)
            print(f"  {'':22s} {a:7.0f} MB  {b:7.0f} MB  {b - a:+6.0f} MB   (largest worker)")
    per_image = 2 * SIDE * SIDE / 2**20
    print(f"  (one decoded 1024 px image + mask: {per_image:.1f} MB; 3N of them: "
          f"{3 * n * per_image:.0f} MB)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-rss", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load avg {load[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="pneumoseg-loader-") as tmp:
        n_total = args.images * (1 if args.no_rss else 4)
        t = time.perf_counter()
        arrays = make_project(Path(tmp), n_total)
        print(
            f"data: {n_total} synthetic {SIDE} px PNGs -> arrays at 256 and 1024 px in "
            f"{time.perf_counter() - t:.1f} s"
        )
        throughput(arrays, args.images, args.sizes, args.workers, args.rounds)
        if not args.no_rss:
            memory(arrays, args.images)
    print(
        f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB"
    )


if __name__ == "__main__":
    main()
