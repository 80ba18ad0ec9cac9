"""SIIM-size rehearsal (``make rehearse``): the real stage commands on synthetic SIIM-like data
at growing N, each measured for wall time, CPU time, peak RSS and disk, with the growth exponent
of time and RSS in N, a log-log plot and a markdown table (``--readme`` writes it into the
README between its rehearsal markers).

- **Data**: 8-bit MONOCHROME2 JPEG Baseline DICOMs at 1024 px in SIIM's stage-1 layout with a
  relative-RLE ``train-rle.csv`` (about 22% positive, 1-2 elliptic lesions) and a sample
  submission; ``N`` training images and ``N * 3205 / 10675`` test images. The full set is made
  once (two processes) and each N is a subset of it (symbolic links).
- **Stages run for real** (``pneumoseg -q <stage>`` in a project folder, no DVC): convert
  (1024 px), arrays (1024 and 512 px), split (5 folds), then thresholds and evaluate on OOF
  maps at each ``--oof-sizes``, once without and once with ``min_component_area`` (the
  component table is built by thresholds and reused by evaluate).
- **OOF maps are generated, not predicted** (a model on 2 CPU cores would take days): each is
  the image's truth blurred to a soft map (peak 0.55-1), plus up to two weaker decoys, zero far
  from both, so the scores are checkable: evaluate's in-sample score is recomputed here with
  ``kaggle_dice_naive`` and must agree.
- **Training** is measured per optimizer step (``bench/gpu_check.py``'s steps on the CPU with
  the SIIM profile's model, batch 4) at 512 and 1024 px; a whole fold is extrapolated from it
  and labelled so.

Disk: everything of one N lives in ``<work>/N<n>/`` and is deleted after it (``--keep`` keeps
it); the arrays are deleted before the OOF maps are written. At full size the peak is the raw
set (~2 GB) + PNGs (~8 GB) + arrays (~35 GB), or the PNGs + the 1024 px OOF maps (~22 GB).

Usage: ``python bench/rehearse.py [--sizes 1000 2500 5000 10675] [--oof-sizes 512 1024]
[--work DIR] [--readme]``. No time limits are asserted anywhere.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import lesion, picture, write_dicom  # noqa: E402

from pneumoseg.rle import rle_encode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL_TRAIN, FULL_TEST = 10675, 3205
SIDE = 1024
TRAIN_DIR, TEST_DIR = "dicom-images-train", "dicom-images-test"
README_START, README_END = "<!-- rehearsal:start -->", "<!-- rehearsal:end -->"
RESULTS = ROOT / "bench/results"


# --- data --------------------------------------------------------------------------------------


def image_id(split: str, i: int) -> str:
    kind = 1 if split == "train" else 2
    return f"1.2.276.0.7230010.3.1.4.8323329.{kind}{i:05d}.1517875{i % 1000:03d}.{100000 + i}"


def make_one(args: tuple[Path, str, int]) -> tuple[str, list[str]]:
    """Write one DICOM; its ImageId and RLE rows (train) or nothing (test)."""
    raw, split, i = args
    rng = np.random.default_rng([2019, 1 if split == "train" else 2, i])
    uid = image_id(split, i)
    folder = raw / (TRAIN_DIR if split == "train" else TEST_DIR) / f"1.2.{i}" / f"1.3.{i}"
    write_dicom(folder / f"{uid}.dcm", picture(SIDE, rng), "jpeg8", uid)
    if split == "test":
        return uid, []
    if rng.random() < 0.22:
        return uid, [rle_encode(lesion(SIDE, rng), "relative") for _ in range(rng.integers(1, 3))]
    return uid, ["-1"]


def full_set(raw: Path, n_train: int, n_test: int) -> dict[str, list[str]]:
    """The full set in ``raw`` (made once): ImageId -> RLE rows ([] for test images)."""
    index = raw / "index.json"
    if index.is_file():
        return json.loads(index.read_text())
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    jobs = [(raw, "train", i) for i in range(n_train)] + [(raw, "test", i) for i in range(n_test)]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        rows = dict(pool.map(make_one, jobs, chunksize=64))
    size = sum(p.stat().st_size for p in raw.rglob("*.dcm"))
    print(
        f"data: {len(jobs)} DICOMs, {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s"
    )
    index.write_text(json.dumps(rows))
    return rows


def subset(full: Path, rows: dict[str, list[str]], raw: Path, n_train: int) -> None:
    """``raw``: links to the first ``n_train`` training images and their share of test images,
    with their csv rows and a sample submission."""
    n_test = round(n_train * FULL_TEST / FULL_TRAIN)
    raw.mkdir(parents=True)
    train = [image_id("train", i) for i in range(n_train)]
    test = [image_id("test", i) for i in range(n_test)]
    for split, ids in (("train", train), ("test", test)):
        top = raw / (TRAIN_DIR if split == "train" else TEST_DIR)
        top.mkdir()
        for i, uid in enumerate(ids):
            (top / uid).mkdir()
            src = full / top.name / f"1.2.{i}" / f"1.3.{i}" / f"{uid}.dcm"
            (top / uid / f"{uid}.dcm").symlink_to(src)
    with (raw / "train-rle.csv").open("w", newline="") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(["ImageId", " EncodedPixels"])
        out.writerows([uid, f" {rle}"] for uid in train for rle in rows[uid])
    with (raw / "sample_submission.csv").open("w", newline="") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(["ImageId", "EncodedPixels"])
        out.writerows([uid, "-1"] for uid in test)


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Measure:
    stage: str
    n: int
    wall_s: float
    cpu_s: float
    peak_rss_mib: float  # anonymous memory (RssAnon): what the processes hold themselves
    disk_mib: float  # what the stage left on disk (the project folder's growth)
    peak_rss_total_mib: float = 0.0  # RSS as ps shows it: also the memory-mapped file pages


last_output: list[str] = [""]  # what the last measured command printed


def anonymous_rss(pid: int) -> int:
    """A process's anonymous resident memory in bytes (``RssAnon``): its heap and arrays, not
    the pages of files it maps (memory-mapped maps and arrays show in RSS but are page cache
    the kernel can drop)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def disk_used(folder: Path) -> int:
    """Bytes the files below ``folder`` occupy (links not followed)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def measured(stage: str, n: int, cmd: list[str], cwd: Path) -> Measure:
    """Run ``cmd`` in ``cwd``; its wall and CPU time, peak RSS of its process tree (sampled
    every 0.1 s) and disk growth (its output in ``last_output``)."""
    before = disk_used(cwd)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = psutil.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = peak_total = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(anonymous_rss(p.pid) for p in tree))
            peak_total = max(peak_total, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - start
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode:
        raise RuntimeError(f"{stage} at N={n} exited {proc.returncode}:\n{output[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - used.ru_utime) + (after.ru_stime - used.ru_stime)
    growth = (disk_used(cwd) - before) / 2**20
    result = Measure(stage, n, wall, cpu, peak / 2**20, growth, peak_total / 2**20)
    last_output[:] = [output]
    print(f"  {stage:<24} N={n:>6}: {wall:8.1f} s wall, {cpu:8.1f} s CPU, "
          f"{result.peak_rss_mib:7.0f} MiB RSS, {growth:9.0f} MiB disk", flush=True)  # fmt: skip
    return result


def pneumoseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "pneumoseg", "-q", *args]


# --- the project -------------------------------------------------------------------------------


def project(folder: Path, raw: Path) -> None:
    """A project folder: the repo's params.yaml with the rehearsal's settings."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(raw_dir=str(raw), size=SIDE, workers=2)
    params["arrays"]["sizes"] = [512]
    params["split"]["n_folds"] = 5
    params["train"]["folds"] = [0, 1, 2, 3, 4]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def set_params(folder: Path, section: str, **values: Any) -> None:
    path = folder / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def oof_maps(folder: Path, size: int, seed: int = 0) -> None:
    """Generated OOF maps at ``size`` of every training image (see the module docstring)."""
    from pneumoseg.artifacts import mask_path, open_oof_arrays, read_folds, write_oof_ids

    folds = read_folds(folder / "data/folds.csv")
    ids = sorted((i, int(f)) for i, (f, _) in folds.items())
    out = folder / "oof"
    shutil.rmtree(out, ignore_errors=True)
    probs, masks = open_oof_arrays(out, len(ids), size)
    rng = np.random.default_rng(seed)
    for row, (uid, _) in enumerate(ids):
        truth = cv2.imread(str(mask_path(folder / "data/processed", uid)), cv2.IMREAD_GRAYSCALE)
        small = cv2.resize(truth, (size, size), interpolation=cv2.INTER_AREA) > 127
        soft = np.zeros((size, size), np.float32)
        if small.any():
            soft = cv2.GaussianBlur(small.astype(np.float32), (0, 0), size / 128)
            soft *= rng.uniform(0.55, 1.0) / max(float(soft.max()), 1e-6)
        for _ in range(int(rng.integers(0, 3))):
            decoy = np.zeros((size, size), np.float32)
            center = tuple(int(v) for v in rng.uniform(0.2, 0.8, 2) * size)
            axes = tuple(int(v) for v in rng.uniform(0.01, 0.05, 2) * size)
            cv2.ellipse(decoy, center, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
            decoy = cv2.GaussianBlur(decoy, (0, 0), size / 128) * rng.uniform(0.2, 0.8)
            soft = np.maximum(soft, decoy)
        probs[row] = np.round(np.clip(soft, 0, 1) * 255).astype(np.uint8)
        masks[row] = small
    probs.flush()
    masks.flush()
    del probs, masks
    write_oof_ids(out, ids)


def check_scores(folder: Path) -> float:
    """evaluate's in-sample score against the naive recomputation of the deployed triplet."""
    from pneumoseg.artifacts import load_oof, native_widths, read_manifest
    from pneumoseg.postprocess import PostProcess, kaggle_dice_naive

    post = PostProcess.load(folder / "models/postprocess.json")
    oof = load_oof(folder / "oof")
    native = native_widths(oof.ids, read_manifest(folder / "data/processed"))
    naive = float(kaggle_dice_naive(oof.probs, oof.masks, post.default, native).mean())
    reported = json.loads((folder / "metrics/evaluate.json").read_text())["kaggle_dice"]
    if abs(naive - reported) > 1e-9:
        raise RuntimeError(f"evaluate says {reported}, the naive recomputation {naive}")
    return naive


TRAIN_STEP = """
import json, resource, sys
sys.path.insert(0, {bench!r})
import torch
from gpu_check import profile_model, train_steps
out = train_steps(profile_model(), torch.device("cpu"), {size}, 4, 3)
print(json.dumps(out))
"""


def training_steps(work: Path, size: int) -> dict[str, Any]:
    """Three CPU steps of the SIIM profile's model at ``size`` (batch 4): the process's
    measure, seconds per image, and a whole fold extrapolated from it (labelled so)."""
    script = TRAIN_STEP.format(bench=str(ROOT / "bench"), size=size)
    m = measured(f"train step ({size} px)", 4, [sys.executable, "-c", script], work)
    steps = json.loads(last_output[0].strip().splitlines()[-1])
    per_image = steps["seconds_per_image"]
    # the SIIM profile: 30 epochs at 512 px, 8 at 1024 px, over a fold's 4/5 of 10,675 images
    epochs = 30 if size == 512 else 8
    fold = per_image * epochs * FULL_TRAIN * 4 / 5
    print(
        f"  -> {per_image:.2f} s per image at {size} px on the CPU; the profile's {epochs} "
        f"epochs at {size} px of one fold: {fold / 3600:.0f} h (extrapolated)",
        flush=True,
    )
    return {"measure": asdict(m), "seconds_per_image": per_image, "fold_hours_extrapolated":
            fold / 3600, "epochs": epochs, "size": size}  # fmt: skip


def rehearse(work: Path, n: int, full: Path, rows: dict, oof_sizes: list[int]) -> list[Measure]:
    """Every measured stage at ``n`` training images; the folder is left for the caller."""
    folder = work / f"N{n}"
    shutil.rmtree(folder, ignore_errors=True)
    subset(full, rows, folder / "raw", n)
    project(folder, folder / "raw")
    out = [
        measured("convert", n, pneumoseg("convert"), folder),
        measured("arrays", n, pneumoseg("arrays"), folder),
        measured("split", n, pneumoseg("split"), folder),
    ]
    shutil.rmtree(folder / "data/arrays")  # no later stage here reads them
    for size in oof_sizes:
        oof_maps(folder, size)
        for area in (None, [0, 2000]):
            shutil.rmtree(folder / ".pneumoseg", ignore_errors=True)  # a cold component table
            set_params(folder, "thresholds", space=thresholds_space(folder, area))
            name = f"@{size}" + (" +components" if area else "")
            out.append(measured(f"thresholds {name}", n, pneumoseg("thresholds"), folder))
            out.append(measured(f"evaluate {name}", n, pneumoseg("evaluate"), folder))
            check_scores(folder)
        shutil.rmtree(folder / "oof")
    return out


def thresholds_space(folder: Path, area: list[int] | None) -> dict[str, Any]:
    space = yaml.safe_load((folder / "params.yaml").read_text())["thresholds"]["space"]
    return space | {"min_component_area": area}


# --- the report --------------------------------------------------------------------------------


def exponents(measures: list[Measure]) -> dict[str, dict[str, float]]:
    """Per stage: the least-squares slope of log(time) and log(RSS) against log(N)."""
    out: dict[str, dict[str, float]] = {}
    for stage in dict.fromkeys(m.stage for m in measures):
        mine = [m for m in measures if m.stage == stage]
        if len({m.n for m in mine}) < 2:
            continue
        n = np.log([m.n for m in mine])
        out[stage] = {
            "time": float(np.polyfit(n, np.log([max(m.wall_s, 1e-3) for m in mine]), 1)[0]),
            "rss": float(np.polyfit(n, np.log([m.peak_rss_mib for m in mine]), 1)[0]),
            "rss_growth": mine[-1].peak_rss_mib / mine[0].peak_rss_mib - 1,
        }
    return out


def table(measures: list[Measure], slopes: dict[str, dict[str, float]], date: str) -> str:
    sizes = sorted({m.n for m in measures})
    head = "| stage | " + " | ".join(f"N={n:,}" for n in sizes) + " | time ~ N^k | RSS ~ N^k |"
    lines = [head, "|" + "---|" * (len(sizes) + 3)]
    for stage in dict.fromkeys(m.stage for m in measures):
        cells = []
        for n in sizes:
            m = next((m for m in measures if m.stage == stage and m.n == n), None)
            cells.append(
                "-"
                if m is None
                else f"{m.wall_s:.0f} s, {m.peak_rss_mib / 1024:.1f} GB, "
                f"{m.disk_mib / 1024:.1f} GB disk"
            )
        k = slopes.get(stage)
        slope = [f"{k['time']:.2f}", f"{k['rss']:.2f}"] if k else ["-", "-"]
        lines.append(f"| {stage} | " + " | ".join(cells + slope) + " |")
    note = (
        f"\n(`make rehearse`, {date}, 2 cores, 24 GiB, no GPU. Each cell: wall time, peak "
        "anonymous RSS of the stage's processes (RssAnon: without the pages of memory-mapped "
        "files, which the JSON has too), disk it left. k: least-squares slope of log(wall "
        "time) and log(peak RssAnon) against log(N). OOF maps generated, not predicted; "
        "training measured per step, in `bench/results/rehearsal.json`.)\n"
    )
    return "\n".join(lines) + "\n" + note


def training_lines(training: list[dict[str, Any]]) -> str:
    lines = [
        f"- training on the CPU, SIIM profile's model, batch 4, {t['size']} px: "
        f"{t['seconds_per_image']:.2f} s per image, peak RSS "
        f"{t['measure']['peak_rss_mib'] / 1024:.1f} GB; its {t['epochs']} epochs of one fold "
        f"would take {t['fold_hours_extrapolated']:.0f} h here (extrapolated)"
        for t in training
    ]
    return "\n".join(lines) + ("\n" if lines else "")


def plot(measures: list[Measure], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for stage in dict.fromkeys(m.stage for m in measures if not m.stage.startswith("train")):
        mine = [m for m in measures if m.stage == stage]
        n = [m.n for m in mine]
        axes[0].loglog(n, [m.wall_s for m in mine], marker="o", label=stage)
        axes[1].loglog(n, [m.peak_rss_mib for m in mine], marker="o", label=stage)
    axes[0].set(xlabel="training images N", ylabel="wall time (s)", title="time")
    axes[1].set(xlabel="training images N", ylabel="peak RSS (MiB)", title="memory")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def write_readme(text: str) -> None:
    readme = ROOT / "README.md"
    body = readme.read_text()
    start, end = body.index(README_START) + len(README_START), body.index(README_END)
    readme.write_text(body[:start] + "\n" + text + body[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2500, 5000, FULL_TRAIN])
    parser.add_argument("--oof-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pneumoseg-rehearsal"))
    parser.add_argument("--no-training", action="store_true", help="skip the training steps")
    parser.add_argument("--keep", action="store_true", help="keep each N's project folder")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--out", type=Path, default=RESULTS / "rehearsal.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    biggest = max(args.sizes)
    full = args.work / f"raw-{biggest}"
    rows = full_set(full, biggest, round(biggest * FULL_TEST / FULL_TRAIN))
    measures: list[Measure] = []
    training = [] if args.no_training else [training_steps(args.work, s) for s in (512, 1024)]
    for n in sorted(args.sizes):
        print(f"N = {n}", flush=True)
        measures += rehearse(args.work, n, full, rows, args.oof_sizes)
        if not args.keep:
            shutil.rmtree(args.work / f"N{n}")
    date = time.strftime("%Y-%m-%d")
    slopes = exponents([m for m in measures if not m.stage.startswith("train")])
    report = {
        "date": date,
        "measures": [asdict(m) for m in measures],
        "exponents": slopes,
        "training_cpu": training,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(measures, args.out.with_suffix(".png"))
    text = table(measures, slopes, date) + training_lines(training)
    print(text)
    if args.readme:
        write_readme(text)


if __name__ == "__main__":
    main()
