"""Benchmark of `pneumoseg convert`: throughput with 1 and 2 workers, and the cost per image
against a bare pydicom -> cv2 loop on the same files.

    python bench/convert.py [--n 200] [--size 512] [--out-size 256] [--repeats 3] [--profile]
    python bench/convert.py --siim     # SIIM-like files: 1024 px, 8-bit JPEG Baseline -> 1024 px

The DICOM set (default 200 files of 512 x 512, in the demo's mix of formats) is built once and
reused from a folder under the temp dir. It is made by ``pneumoseg.demo.dataset.generate_demo``
when that exists, else by the small generator below. ``--siim``: what SIIM ships instead,
1024 x 1024, 8-bit MONOCHROME2, JPEG Baseline (~100-150 KB each), converted at 1024 px like the
SIIM profile (``data.size=1024``); the projected time of the 12,047 SIIM files is printed.
Targets: 2 workers >= 1.8x one worker; pneumoseg's per-image cost within 1.2x of the bare loop.
Only ratios are printed; nothing is asserted (timings depend on the machine).
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pneumoseg.conversion import convert
from pneumoseg.rle import rle_encode

TARGET_PARALLEL = 1.8
TARGET_OVERHEAD = 1.2
SIIM_FILES = 12047

# format -> share, as in the demo: mostly 8-bit JPEG Baseline like SIIM.
MIX = {
    "jpeg8": 0.60,
    "raw8": 0.15,
    "rle8": 0.05,
    "rle16": 0.05,
    "mono1_raw12": 0.05,
    "mono1_j2k12": 0.05,
    "hi_novoi16": 0.05,
}


# --- data set -------------------------------------------------------------------------------------


def picture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A quick chest-like uint8 image with texture (so codecs have real work to do)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 45 + 25 * yy
    body = (np.abs(xx - 0.5) < 0.44) & (yy > 0.1)
    img = np.where(body, 150 + 45 * yy, img)
    for cx, rx in ((0.31, 0.15), (0.72, 0.12)):
        lung = ((xx - cx) / rx) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        img = np.where(lung, 60 + 60 * (yy - 0.2) + 10 * np.sin(yy * 70 + rng.uniform(0, 6)), img)
    img = np.where((np.abs(xx - 0.56) < 0.07) & (yy > 0.15) & (yy < 0.9), 215, img)
    noise = cv2.GaussianBlur(rng.normal(0, 6, (size, size)).astype(np.float32), (0, 0), 1.5)
    return np.clip(img + noise + rng.normal(0, 2, (size, size)), 0, 255).astype(np.uint8)


def lesion(size: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    center = (int(rng.uniform(0.2, 0.8) * size), int(rng.uniform(0.25, 0.6) * size))
    axes = (int(rng.uniform(0.02, 0.08) * size), int(rng.uniform(0.04, 0.15) * size))
    cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask


def write_dicom(path: Path, image: np.ndarray, fmt: str, uid: str) -> None:
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        RLELossless,
    )

    bits = 16 if fmt.endswith("16") else 12 if fmt.endswith("12") else 8
    mono1 = fmt.startswith("mono1")
    top = (1 << bits) - 1
    stored = np.round(image.astype(np.float64) * top / 255)
    if mono1:
        stored = top - stored
    arr = stored.astype(np.uint8 if bits == 8 else np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, uid
    ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientAge = "BENCH^X", "B1", "F", "050Y"
    ds.Modality, ds.ViewPosition = "CR", "PA"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if fmt in ("rle16", "mono1_raw12", "mono1_j2k12"):
        ds.WindowCenter, ds.WindowWidth = top * 0.5, top * 0.9
    if fmt == "jpeg8":
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=92)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
        if fmt.startswith("rle"):
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        elif "j2k" in fmt:
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _own_set(raw: Path, n: int, size: int, mix: dict[str, float], seed: int = 2019) -> None:
    """SIIM layout with the format ``mix``; ~22% of the images carry a lesion."""
    rng = np.random.default_rng(seed)
    formats = [f for f, share in mix.items() for _ in range(max(1, round(share * n)))][:n]
    formats += ["jpeg8"] * (n - len(formats))
    rows = ["ImageId, EncodedPixels"]
    for i, fmt in enumerate(formats):
        uid = f"1.2.276.0.7230010.3.1.4.8323329.{9000 + i}.1517875{i:03d}.{100000 + i}"
        path = raw / "dicom-images-train" / f"1.2.9.1.{i}" / f"1.2.9.2.{i}" / f"{uid}.dcm"
        write_dicom(path, picture(size, rng), fmt, uid)
        if rng.random() < 0.22:
            rows += [f"{uid}, {rle_encode(lesion(size, rng))}" for _ in range(rng.integers(1, 3))]
        else:
            rows.append(f"{uid}, -1")
    (raw / "train-rle.csv").write_text("\n".join(rows) + "\n")


def _demo_generator() -> Callable[..., object] | None:
    try:
        from pneumoseg.demo.dataset import generate_demo
    except ImportError:
        return None
    return generate_demo


def _call_demo(generate: Callable[..., object], raw: Path, n: int, size: int) -> None:
    """Call generate_demo with whatever of its parameters we can fill in."""
    from pneumoseg.params import DemoParams

    demo = DemoParams(out_dir=str(raw), n_train=n, n_test=0, size=size, seed=2019)
    values = {**demo.model_dump(), "out": str(raw), "out_dir": raw, "progress": False}
    kwargs = {}
    for name, param in inspect.signature(generate).parameters.items():
        if name in ("params", "demo", "cfg", "config") or param.annotation in (
            DemoParams,
            "DemoParams",
        ):
            kwargs[name] = demo
        elif name in values:
            kwargs[name] = values[name]
    generate(**kwargs)


def _build(raw: Path, make: Callable[[], object], fallible: bool) -> bool:
    """Build the set in ``raw`` unless a complete one is there; False if ``make`` failed."""
    done = raw / ".complete"
    if done.exists():
        return True
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    print(f"building the DICOM set in {raw} ...", flush=True)
    try:
        make()
    except Exception as exc:
        if not fallible:
            raise
        print(f"  failed ({type(exc).__name__}: {exc}); falling back to the bench generator")
        shutil.rmtree(raw, ignore_errors=True)
        return False
    done.write_text("ok\n")
    return True


def dataset(n: int, size: int, siim: bool = False) -> tuple[Path, str]:
    """The raw folder (built once, then reused) and the name of its generator."""
    root = Path(tempfile.gettempdir()) / "pneumoseg-bench"
    if siim:
        raw = root / f"siim-{n}x{size}" / "raw"
        _build(raw, lambda: _own_set(raw, n, size, {"jpeg8": 1.0}), fallible=False)
        return raw, "SIIM-like: 8-bit MONOCHROME2 JPEG Baseline"
    generate = _demo_generator()
    if generate is not None:
        raw = root / f"demo-{n}x{size}" / "raw"
        if _build(raw, lambda: _call_demo(generate, raw, n, size), fallible=True):
            return raw, "pneumoseg.demo.dataset.generate_demo"
    raw = root / f"bench-{n}x{size}" / "raw"
    _build(raw, lambda: _own_set(raw, n, size, MIX), fallible=False)
    return raw, "bench generator"


# --- measurements -------------------------------------------------------------------------------


def bare_loop(paths: list[Path], out: Path, size: int) -> None:
    """The minimum any converter must do: read, decode, resize, write."""
    import pydicom

    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        arr = pydicom.dcmread(path).pixel_array
        small = cv2.resize(arr, (size, size), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(out / f"{path.stem}.png"), small)


@dataclass
class Timing:
    wall: float  # seconds, best of the repeats
    own_cpu: float  # CPU seconds of this process in that run
    child_cpu: float  # CPU seconds of its worker processes in that run

    @property
    def cpu(self) -> float:
        return self.own_cpu + self.child_cpu


def best_of(repeats: int, fn: Callable[[], object]) -> Timing:
    """The fastest (wall clock) of ``repeats`` runs, with the CPU time it used."""
    runs = []
    for _ in range(repeats):
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu, start = time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        child_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        runs.append(Timing(wall, time.process_time() - cpu, child_cpu))
    return min(runs, key=lambda t: t.wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of DICOMs [%(default)s]")
    parser.add_argument("--size", type=int, default=None, help="DICOM side [512; --siim 1024]")
    parser.add_argument("--out-size", type=int, default=None, help="PNG side [256; --siim 1024]")
    parser.add_argument("--siim", action="store_true", help="SIIM-like JPEG files at 1024 px")
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs [%(default)s]")
    parser.add_argument("--profile", action="store_true", help="always print a cProfile")
    args = parser.parse_args(argv)
    args.size = args.size or (1024 if args.siim else 512)
    args.out_size = args.out_size or (1024 if args.siim else 256)

    raw, source = dataset(args.n, args.size, args.siim)
    paths = sorted(raw.rglob("*.dcm"))
    n = len(paths)
    kb = sum(p.stat().st_size for p in paths) / n / 1024
    work = Path(tempfile.mkdtemp(prefix="pneumoseg-bench-out-"))
    try:

        def run_convert(workers: int) -> None:
            convert(raw, work / f"w{workers}", size=args.out_size, workers=workers, progress=False)

        # warm-up: imports, codec plugins, page cache
        bare_loop(paths[:10], work / "warm", args.out_size)
        run_convert(1)
        load_before = os.getloadavg()[0]
        bare = best_of(args.repeats, lambda: bare_loop(paths, work / "bare", args.out_size))
        one = best_of(args.repeats, lambda: run_convert(1))
        two = best_of(args.repeats, lambda: run_convert(2))
        load_after = os.getloadavg()[0]

        def line(name: str, t: Timing) -> str:
            return (
                f"{name:<19}: {n / t.wall:6.1f} img/s  {1000 * t.wall / n:6.2f} ms/img wall"
                f"  {1000 * t.cpu / n:6.2f} ms/img CPU"
            )

        print(
            f"data: {n} DICOMs {args.size}x{args.size}, {kb:.0f} KB each on average "
            f"-> {args.out_size} PNG ({source})"
        )
        print(f"      {raw}")
        print(f"machine: {os.cpu_count()} CPUs, load average {load_before:.2f} -> {load_after:.2f}")
        print(line("convert, 1 worker", one))
        print(line("convert, 2 workers", two))
        print(line("bare loop", bare))
        speedup, overhead = one.wall / two.wall, one.wall / bare.wall
        # what two idle CPUs would give: the parent's own work is serial, the workers' is split
        ideal = one.cpu / (two.own_cpu + two.child_cpu / 2)
        print(
            f"2 workers / 1 worker throughput = {speedup:.2f}x wall, {ideal:.2f}x on 2 idle CPUs"
            f" (from CPU times)  (target >= {TARGET_PARALLEL})"
        )
        print(
            f"pneumoseg / bare loop per image = {overhead:.2f}x wall, "
            f"{one.cpu / bare.cpu:.2f}x CPU  (target <= {TARGET_OVERHEAD})"
        )
        print(
            f"projected: {SIIM_FILES} such files in {SIIM_FILES * two.wall / n / 60:.1f} min "
            f"with 2 workers ({SIIM_FILES * one.wall / n / 60:.1f} min with 1)"
        )
        if load_before > 0.5 or load_after > 2.5:
            print("note: other processes were running; wall-clock ratios are unreliable")
        if args.profile or overhead > TARGET_OVERHEAD:
            profiler = cProfile.Profile()
            profiler.runcall(run_convert, 1)
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(15)
            print("\ncProfile of one 1-worker conversion (by own time):")
            print(stream.getvalue())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
