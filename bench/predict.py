"""`pneumoseg predict` throughput: decoding overlapped with the model, against a bare loop.

    python bench/predict.py PROJECT [--n 128] [--rounds 3]

PROJECT: a trained pneumoseg project (``models/folds/fold<k>/model.pt`` +
``models/postprocess.json``, e.g. after ``make demo``); its DICOMs (``data.raw_dir``, the demo's
at their native 512 px) are the inputs. Images per second, median of ``--rounds``, on the CPU
(the figure of record until a GPU check runs; on a GPU the target is >= 0.8x model-only):
- ``decode only``: ``read_dicom`` + the bundle's ``prepare`` (what predict does per file);
- ``model only``: the fold ensemble with its TTA on the prepared images, in its batches;
- ``bare``: the two one after the other per batch, nothing overlapped;
- ``predict``: the command's own path (``_predict_into``: decoding in a background thread,
  the model, the triplet at native size, the csv, the mask and overlay PNGs written by a
  writer thread).
Where predict lands between the slower of decode/model (full overlap) and their sum (none) is
printed. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from pneumoseg.commands.predict import _predict_into, load_model  # noqa: E402
from pneumoseg.dicom import read_dicom  # noqa: E402
from pneumoseg.params import load_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    project = args.project.resolve()
    os.chdir(project)
    params = load_params("params.yaml")
    bundle = load_model(params, "models", device="cpu")
    files = sorted(Path(params.data.raw_dir).rglob("*.dcm"))[: args.n]
    n = len(files)
    ens = bundle.ensemble
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load avg {os.getloadavg()[0]:.2f}; {n} DICOMs of {project.name}, "
        f"{len(ens.models)} models, flip TTA {ens.tta_hflip}, batch {ens.batch_size}"
    )

    def decode() -> list:
        return [bundle.prepare(read_dicom(f).image) for f in files]

    prepared = decode()

    def model_only() -> None:
        for i in range(0, n, ens.batch_size):
            ens.predict(prepared[i : i + ens.batch_size])

    def bare() -> None:
        for i in range(0, n, ens.batch_size):
            batch = [bundle.prepare(read_dicom(f).image) for f in files[i : i + ens.batch_size]]
            ens.predict(batch)

    def predict() -> None:
        with tempfile.TemporaryDirectory(prefix="pneumoseg-predict-") as tmp:
            _predict_into(Path(tmp), bundle, files, [], "relative", progress=False)

    cases = {"decode only": decode, "model only": model_only, "bare": bare, "predict": predict}
    for fn in cases.values():
        fn()  # warm-up
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    for r in range(args.rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            t = time.perf_counter()
            cases[name]()
            seconds[name].append(time.perf_counter() - t)
    rate = {k: n / statistics.median(v) for k, v in seconds.items()}
    for name, r in rate.items():
        print(f"  {name:<12} {r:7.1f} img/s")
    slower = max(seconds["decode only"], seconds["model only"], key=statistics.median)
    best, worst = (
        statistics.median(slower),
        sum(statistics.median(seconds[k]) for k in ("decode only", "model only")),
    )
    got = statistics.median(seconds["predict"])
    where = (worst - got) / (worst - best) if worst > best else float("nan")
    print(
        f"predict / bare = {rate['predict'] / rate['bare']:.2f}x; predict / model only = "
        f"{rate['predict'] / rate['model only']:.2f}x; overlap: predict takes {got:.2f} s between "
        f"{best:.2f} s (full overlap) and {worst:.2f} s (none): {where:.0%} of the way to full"
    )


if __name__ == "__main__":
    main()
