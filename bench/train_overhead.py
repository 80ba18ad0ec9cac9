"""Per-step cost of pneumoseg's training loop versus a bare PyTorch loop (CPU, demo defaults).

pneumoseg side: a temp project (synthetic 256 px processed PNGs + folds.csv + a params.yaml
derived from the repo's, paths inside the temp dir), a real :class:`FoldTrainer` and its real
``make_part`` (SegDataset over the training arrays, albumentations, SampleRateSampler) and
``train_epoch`` (ComboLoss, autocast/GradScaler, channels_last,
CPU deterministic mode as FoldTrainer sets it),
plus the per-epoch ``Tracker.log_metrics`` batch into a real sqlite MLflow store.

bare side: the same architecture built with the same seed, contiguous memory format, the same
batch size, the same ComboLoss (the loss weights of params.yaml, so the comparison is about the
loop and not about the loss), ``torch.optim.Adam`` with the same lr, over tensors built once in
memory (no augmentation, no tracking, deterministic mode off), shuffled per epoch. Two bare
variants run: ``bare`` (contiguous, what a plain loop does) and ``bare_cl`` (model and input in
channels_last like pneumoseg's): the ratio to ``bare_cl`` isolates the pipeline's overhead (data,
augmentation, sampler, tracking) from the memory-format choice, which alone changes CPU speed.

All are warmed up for one epoch, then timed epochs alternate (order rotated every round).
Per-step times come from an optimizer step post-hook (each step = data + forward + backward +
step); the ratio uses the per-step time amortised over the whole epoch (pneumoseg's includes
set_epoch and tracking). Loader-only passes (the data part of the breakdown) are interleaved
in the same rotation. Other processes on a small machine inflate wall times a lot (two processes
with two torch threads each on two cores thrash): the process CPU time per step and the "best
epoch" column are the least disturbed figures, and ``--threads 1`` is far more stable there.
FoldTrainer switches off deterministic mode's NaN fill of new tensors on CPU (it cost ~10% of a
step); ``--nan-fill`` switches it back on to measure that cost.

    .venv/bin/python bench/train_overhead.py [--sizes 128 256] [--epochs 4] [--profile 2]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(_key, _value)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # would override the temp sqlite store

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.deterministic  # noqa: E402
import yaml  # noqa: E402

from pneumoseg.arrays import write_arrays  # noqa: E402
from pneumoseg.artifacts import read_folds, write_folds  # noqa: E402
from pneumoseg.data import SegDataset  # noqa: E402
from pneumoseg.folds import stratified_folds  # noqa: E402
from pneumoseg.losses import ComboLoss  # noqa: E402
from pneumoseg.models import build_model  # noqa: E402
from pneumoseg.params import Params, flatten, load_params, stage_values  # noqa: E402
from pneumoseg.training.state import seed_everything  # noqa: E402
from pneumoseg.training.trainer import FoldTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAN_FILL = False  # --nan-fill
PROCESSED_SIDE = 256
FOLD = 0


# --------------------------------------------------------------------------------- data
def make_processed(root: Path, n: int, positive_fraction: float, seed: int) -> None:
    """Synthetic chest-like 256 px PNGs (+ ellipse masks for positives), manifest, folds."""
    rng = np.random.default_rng(seed)
    side = PROCESSED_SIDE
    images, masks = root / "data/processed/images", root / "data/processed/masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    positive = np.zeros(n, dtype=bool)
    positive[rng.choice(n, round(n * positive_fraction), replace=False)] = True
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    body = 70.0 + 120.0 * np.exp(-((xx - 0.5) ** 2) / 0.09 - ((yy - 0.55) ** 2) / 0.15)
    labels: dict[str, int] = {}
    for i in range(n):
        image = body + rng.normal(0.0, 6.0, body.shape)
        for cx in (0.32, 0.68):  # two darker lungs, jittered
            lung = ((xx - cx - rng.normal(0, 0.01)) / 0.13) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
            image[lung] -= 45.0
        mask = np.zeros((side, side), np.uint8)
        if positive[i]:
            for _ in range(rng.integers(1, 3)):
                centre = (int(rng.uniform(0.2, 0.8) * side), int(rng.uniform(0.25, 0.7) * side))
                axes = (int(rng.uniform(0.03, 0.12) * side), int(rng.uniform(0.03, 0.15) * side))
                cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
            image[mask > 0] -= 20.0
        image_id = f"bench.{i:05d}"
        cv2.imwrite(str(images / f"{image_id}.png"), np.clip(image, 0, 255).astype(np.uint8))
        cv2.imwrite(str(masks / f"{image_id}.png"), mask)
        labels[image_id] = int(positive[i])
    with (root / "data/processed/manifest.csv").open("w") as fh:
        fh.write("ImageId,split,has_mask,mask_pixels,height,width\n")
        fh.writelines(f"{k},train,{v},,{side},{side}\n" for k, v in labels.items())
    write_folds(root / "data/folds.csv", stratified_folds(labels, 5, seed), labels)
    write_arrays(root / "data/processed", root / "data/arrays", [128], progress=False)


def write_params(root: Path, size: int, rate: float) -> Params:
    """The repo's params.yaml, one part at ``size``, every path inside ``root`` (the cwd)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["processed_dir"] = "data/processed"
    raw["arrays"]["out_dir"] = "data/arrays"
    raw["split"].update({"out": "data/folds.csv", "n_folds": 5})
    train = raw["train"]
    train.update(
        folds=[FOLD],
        models_dir="models",
        work_dir="checkpoints",
        metrics_dir="metrics",
        plots_dir="plots",
    )
    part = dict(train["parts"][0])
    # a constant positive rate: every timed epoch has the same number of steps
    part.update(size=size, sample_rate={"start": rate, "shape": "constant"})
    train["parts"] = [part]
    raw["mlflow"].update(
        tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db",
        artifact_location=str(root / "mlruns/artifacts"),
        experiment="bench-train-overhead",
    )
    path = root / f"params-{size}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path)


# ---------------------------------------------------------------------------- timing
class StepClock:
    """Timestamps every optimizer step (post-hook), so per-step times need no loop change."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.stamps: list[float] = []
        optimizer.register_step_post_hook(lambda *_: self.stamps.append(time.perf_counter()))

    @contextlib.contextmanager
    def epoch(self, steps_out: list[float]) -> Iterator[None]:
        self.stamps = [time.perf_counter()]
        yield
        steps_out.extend(np.diff(self.stamps).tolist())


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    if len(values) < 4:
        return ""
    q = np.percentile(values, [25, 75]) * 1e3
    return f"[IQR {q[0]:.1f}-{q[1]:.1f}]"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


# ------------------------------------------------------------------------- benchmark
class BareSide:
    """A bare loop: model, Adam, the same ComboLoss, shuffled slices of in-memory tensors."""

    def __init__(
        self,
        model_cfg: Any,
        seed: int,
        part: Any,
        x: torch.Tensor,
        y: torch.Tensor,
        memory_format: torch.memory_format,
    ) -> None:
        torch.manual_seed(seed)
        self.model = build_model(model_cfg).to(memory_format=memory_format)
        self.x, self.y = x.contiguous(memory_format=memory_format), y
        self.loss_fn = ComboLoss(part.loss)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=part.lr)
        self.clock = StepClock(self.optimizer)
        self.gen = torch.Generator().manual_seed(seed)

    def epoch(self, batch_size: int, n_items: int) -> int:
        model, opt, loss_fn = self.model, self.optimizer, self.loss_fn
        model.train()
        perm = torch.randperm(len(self.x), generator=self.gen)[:n_items]
        total, n = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss, _ = loss_fn(model(self.x[idx]), self.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            n += 1
        return n


class Bench:
    """One size: the pneumoseg side (real FoldTrainer) and the bare side, same model init."""

    def __init__(self, root: Path, size: int, rate: float) -> None:
        self.size = size
        self.params = write_params(root, size, rate)
        self.trainer = FoldTrainer(self.params, FOLD, progress=False)
        tr, cfg = self.trainer, self.trainer.cfg
        self.deterministic = torch.are_deterministic_algorithms_enabled()  # FoldTrainer's choice
        if NAN_FILL:
            torch.utils.deterministic.fill_uninitialized_memory = True
        self.nan_fill = torch.utils.deterministic.fill_uninitialized_memory
        self.part = cfg.parts[0]
        self.batch_size = cfg.batch_size
        seed = cfg.seed + FOLD
        # ---- pneumoseg side, built exactly as FoldTrainer.run builds it
        seed_everything(seed)
        self.model = build_model(cfg.model).to(tr.device, memory_format=tr.memory_format)
        tr.model = tr.ddp_model = self.model
        self.bench_part = tr.make_part(0, self.part, 1)
        self.sampler = self.bench_part.sampler
        self.loader = self.bench_part.train_loader
        self.optimizer = self.bench_part.optimizer
        run_id = tr.tracker.start(f"bench-{size}px", {"stage": "bench"})
        if run_id is None:
            raise RuntimeError("MLflow tracker did not start (see the warning above)")
        tr.tracker.log_params(flatten(stage_values(self.params, "train")))
        self.clock = StepClock(self.optimizer)
        # ---- bare sides: same architecture and init seed, plain tensors in memory
        plain = SegDataset(tr.train_ids, self.params.arrays.out_dir, size, cfg.model.in_channels)
        items = [plain[i] for i in range(len(plain))]
        x = torch.stack([x for x, _, _ in items])
        y = torch.stack([y for _, y, _ in items])
        self.bare = {
            "bare": BareSide(cfg.model, seed, self.part, x, y, torch.contiguous_format),
            "bare_cl": BareSide(cfg.model, seed, self.part, x, y, torch.channels_last),
        }
        for side in self.bare.values():
            for (k, a), b in zip(
                self.model.state_dict().items(), side.model.state_dict().values(), strict=True
            ):
                if not torch.equal(a, b):
                    raise RuntimeError(f"bare model init differs from pneumoseg's at {k}")
        # ---- results (seconds)
        self.sides = ["pneumoseg", *self.bare]
        self.steps: dict[str, list[float]] = {k: [] for k in self.sides}
        self.per_epoch: dict[str, list[float]] = {k: [] for k in self.sides}
        self.cpu: dict[str, list[float]] = {k: [] for k in self.sides}  # process CPU s/step
        self.tracking: list[float] = []
        self.loader_batches: list[float] = []
        self.n_steps: dict[str, int] = {}

    # ---- one epoch of each side
    def pneumoseg_epoch(self, epoch: int, record: bool = True) -> None:
        torch.use_deterministic_algorithms(self.deterministic, warn_only=True)
        steps: list[float] = []
        c0, t0 = time.process_time(), time.perf_counter()
        self.sampler.set_epoch(epoch, self.part.sample_rate.start)
        with self.clock.epoch(steps):
            tr = self.trainer.train_epoch(self.bench_part, f"e{epoch}")
            tr.pop("items")
        t1 = time.perf_counter()
        self.trainer.tracker.log_metrics(self._row(tr, t1 - t0), step=epoch)
        t2, c2 = time.perf_counter(), time.process_time()
        if self.trainer.tracker.failed:
            raise RuntimeError("MLflow logging failed (see the warning above)")
        if record:
            self.steps["pneumoseg"] += steps
            self.per_epoch["pneumoseg"].append((t2 - t0) / len(self.loader))
            self.cpu["pneumoseg"].append((c2 - c0) / len(self.loader))
            self.tracking.append(t2 - t1)
            self.n_steps["pneumoseg"] = len(self.loader)

    def _row(self, tr: dict[str, float], seconds: float) -> dict[str, float]:
        """A metrics row shaped like FoldTrainer.run's (validation values stand in)."""
        loss = tr.pop("loss")
        parts = {f"train_{k}": v for k, v in tr.items()}
        val = {f"val_{k}": v for k, v in tr.items()}
        return {
            "size": self.size,
            "lr": self.optimizer.param_groups[0]["lr"],
            "sample_rate": self.sampler.achieved_rate,
            "train_loss": loss,
            **parts,
            "val_loss": loss,
            **val,
            "val_kaggle_dice": 0.5,
            "val_dice_pos": 0.5,
            "val_iou_pos": 0.5,
            "val_empty_acc": 0.5,
            "val_pos_acc": 0.5,
            "epoch_seconds": seconds,
        }

    def bare_epoch(self, name: str, record: bool = True) -> None:
        torch.use_deterministic_algorithms(False)
        side = self.bare[name]
        steps: list[float] = []
        c0, t0 = time.process_time(), time.perf_counter()
        with side.clock.epoch(steps):
            n = side.epoch(self.batch_size, len(self.sampler))
        if record:
            self.steps[name] += steps
            self.per_epoch[name].append((time.perf_counter() - t0) / n)
            self.cpu[name].append((time.process_time() - c0) / n)
            self.n_steps[name] = n

    # ---- breakdown
    def loader_only(self, epoch: int) -> None:
        """Per-batch time of iterating the real train loader alone (page cache warm)."""
        self.sampler.set_epoch(epoch, self.part.sample_rate.start)
        t = time.perf_counter()
        for _ in self.loader:
            now = time.perf_counter()
            self.loader_batches.append(now - t)
            t = now

    def augmentation_only(self, n_items: int) -> tuple[float, float]:
        """Per-item seconds of (set_random_seed, transform call) on loaded arrays."""
        ds = self.loader.dataset
        transform = ds.transform
        seeds = np.random.default_rng(0).integers(0, 2**31, n_items)
        seed_t, call_t = [], []
        for k in range(n_items):
            image, mask = ds.load(k % len(ds))
            t0 = time.perf_counter()
            transform.set_random_seed(int(seeds[k]))
            t1 = time.perf_counter()
            transform(image=image, mask=mask)
            t2 = time.perf_counter()
            seed_t.append(t1 - t0)
            call_t.append(t2 - t1)
        return med(seed_t), med(call_t)

    def profile(self, epochs: int, first_epoch: int, top: int = 25) -> str:
        prof = cProfile.Profile()
        prof.enable()
        for e in range(epochs):
            self.pneumoseg_epoch(first_epoch + e, record=False)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
        return out.getvalue()


def run_size(root: Path, size: int, rate: float, epochs: int, profile: int) -> dict[str, Any]:
    b = Bench(root, size, rate)
    m = b.params.train.model
    print(
        f"\n=== {size} px: {m.arch}/{m.encoder}, batch {b.batch_size}, "
        f"{len(b.trainer.train_ids)} train images, channels_last={b.params.train.channels_last}, "
        f"amp active={b.trainer.amp}, CPU deterministic mode (FoldTrainer)={b.deterministic} "
        f"(NaN fill {b.nan_fill}), "
        f"loss (both sides)={b.bench_part.loss_fn.weights}; load avg {load()}"
    )
    epoch = 1
    b.pneumoseg_epoch(epoch, record=False)  # warm-up: page cache, sqlite, allocators
    for name in b.bare:
        b.bare_epoch(name, record=False)
    for rep in range(epochs):  # rotate the order of the sides every repetition
        epoch += 1
        runs: list[Callable[[], None]] = [
            partial(b.pneumoseg_epoch, epoch),
            *(partial(b.bare_epoch, name) for name in b.bare),
            partial(b.loader_only, 1000 + epoch),  # data alone, interleaved like the rest
        ]
        k = rep % len(runs)
        for fn in runs[k:] + runs[:k]:
            fn()
    loader = b.loader_batches
    aug_seed, aug_call = b.augmentation_only(200)
    res: dict[str, Any] = {
        "size": size,
        "step": {k: med(v) for k, v in b.steps.items()},
        "amort": {k: med(v) for k, v in b.per_epoch.items()},
        "best": {k: min(v) for k, v in b.per_epoch.items()},
        "p10": {k: float(np.percentile(v, 10)) for k, v in b.steps.items()},
        "cpu": {k: med(v) for k, v in b.cpu.items()},
        "loader": med(loader),
        "aug_seed": aug_seed * b.batch_size,
        "aug_call": aug_call * b.batch_size,
        "tracking": med(b.tracking),
        "load": load(),
    }
    steps = ", ".join(f"{k} {v}" for k, v in b.n_steps.items())
    print(f"steps/epoch: {steps}; {epochs} timed epochs per side; load avg {res['load']}")
    print(
        "  side       per-step median  [IQR]                  p10  amortised/epoch  best epoch"
        "   CPU time/step"
    )
    for k in b.sides:
        print(
            f"  {k:9s} {ms(res['step'][k])} {spread(b.steps[k]):22s} {ms(res['p10'][k])}"
            f"      {ms(res['amort'][k])}   {ms(res['best'][k])}   {ms(res['cpu'][k])}"
        )
    for ref, what in (("bare", "bare, contiguous"), ("bare_cl", "bare, channels_last")):
        print(
            f"  ratio pneumoseg / {what:20s} amortised {ratio(res, 'amort', ref):.3f}"
            f"  per-step {ratio(res, 'step', ref):.3f}  p10 {ratio(res, 'p10', ref):.3f}"
            f"  best epoch {ratio(res, 'best', ref):.3f}  CPU time {ratio(res, 'cpu', ref):.3f}"
        )
    n = b.n_steps["pneumoseg"]
    print("  breakdown (pneumoseg, per batch unless said):")
    print(f"    loader alone (page cache warm)       {ms(res['loader'])} {spread(loader)}")
    print(f"      augmentation call (x batch)        {ms(res['aug_call'])}")
    print(f"      aug set_random_seed (x batch)      {ms(res['aug_seed'])}")
    print(f"    MLflow log_metrics per epoch         {ms(res['tracking'])} {spread(b.tracking)}")
    print(f"      amortised per step                 {ms(res['tracking'] / n)}")
    rest = res["step"]["pneumoseg"] - res["step"]["bare_cl"] - res["loader"]
    print(f"    step - bare_cl step - loader         {ms(rest)}  (noise + loop differences)")
    if profile:
        print(f"  cProfile of {profile} pneumoseg epoch(s), top by tottime:")
        print(b.profile(profile, epoch + 1))
    return res


def ratio(res: dict[str, Any], key: str, ref: str) -> float:
    return res[key]["pneumoseg"] / res[key][ref]


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--epochs", type=int, default=4, help="timed epochs per side (after warm-up)")
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--positive", type=float, default=0.25)
    ap.add_argument(
        "--rate",
        type=float,
        default=0.5,
        help="constant positive sample rate (demo schedule: 0.8 -> 0.4); sets the epoch length",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument(
        "--nan-fill",
        action="store_true",
        help="deterministic mode's NaN fill of new tensors back on (FoldTrainer turns it off)",
    )
    ap.add_argument("--profile", type=int, default=0, help="cProfile N extra pneumoseg epochs")
    ap.add_argument("--keep", action="store_true", help="keep the temp project")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global NAN_FILL
    NAN_FILL = args.nan_fill
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}"
    )
    cwd = os.getcwd()
    tmp = tempfile.TemporaryDirectory(prefix="pneumoseg-bench-")
    root = Path(tmp.name).resolve()
    results = []
    try:
        os.chdir(root)
        make_processed(root, args.images, args.positive, seed=2019)
        folds = read_folds(root / "data/folds.csv")
        train = [pos for fold, pos in folds.values() if fold != FOLD]
        print(
            f"data: {args.images} synthetic {PROCESSED_SIDE} px PNGs, {sum(train)}/{len(train)} "
            f"positive train images (fold {FOLD} held out); sampler rate {args.rate}"
        )
        for size in args.sizes:
            results.append(run_size(root, size, args.rate, args.epochs, args.profile))
    finally:
        os.chdir(cwd)
        if args.keep:
            print(f"kept {root}")
        else:
            tmp.cleanup()
    print("\nsummary: per-step time amortised over the epoch (median of epochs); target <= 1.10")
    print(
        " size   pneumoseg       bare    bare_cl  ratio/bare  ratio/bare_cl"
        "  (CPU-time ratios)   loader/batch tracking/epoch"
    )
    for r in results:
        a = r["amort"]
        print(
            f"{r['size']:5d} {ms(a['pneumoseg'])} {ms(a['bare'])} {ms(a['bare_cl'])}"
            f"     {ratio(r, 'amort', 'bare'):.3f}          {ratio(r, 'amort', 'bare_cl'):.3f}"
            f"     ({ratio(r, 'cpu', 'bare'):.3f} {ratio(r, 'cpu', 'bare_cl'):.3f})"
            f"  {ms(r['loader'])} {ms(r['tracking'])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
