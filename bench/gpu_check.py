"""GPU check (``make gpu-check``): what a CUDA machine must show before a SIIM-size run, in one
JSON. Written without a GPU at hand, so that it runs unchanged the first time one is there.

- **train**: a few optimizer steps of the SIIM profile's model (``profiles/siim-1024.sets``:
  its ``train.model`` keys, no pretrained weights) at each size, with AMP (float16 autocast,
  GradScaler) and channels_last as training runs them: loss finite, the dtype the network
  really computed in under autocast, seconds per image and peak GPU memory per batch.
- **half_vs_float**: inference under float16 autocast against float32 on the same batch: the
  largest probability difference and how many pixels and whole masks (p > 0.5) agree.
- **ddp**: a one-rank ``torchrun`` on NCCL (gloo on the CPU) whose all-reduce must add up.
- **predict**: :class:`pneumoseg.inference.Ensemble` (the prediction path of oof, submit and
  predict, flip TTA off) against the bare model on the same batches: images per second and the
  ratio (the README's target: >= 0.8x model-only).

``--device cpu`` runs the same plumbing on the CPU (float32 training, bfloat16 as the half
type, gloo), which is how ``tests/test_gpu_check.py`` keeps it from rotting. No time limits
are asserted. Usage: ``python bench/gpu_check.py [--device cuda] [--out gpu-check.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles/siim-1024.sets"
MODEL_PREFIX = "train.model."


def profile_model(profile: Path = PROFILE) -> Any:
    """The ``train.model`` section of params.yaml with the profile's ``train.model.*`` sets
    applied and validated, without pretrained weights (none can be downloaded here, and they
    change neither memory nor speed)."""
    from pneumoseg.params.train import ModelParams

    model = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["model"]
    for line in profile.read_text().splitlines():
        key, _, value = line.strip().partition("=")
        if key.startswith(MODEL_PREFIX):
            model[key.removeprefix(MODEL_PREFIX)] = yaml.safe_load(value)
    return ModelParams.model_validate(model | {"encoder_weights": None})


def batch_of(size: int, batch: int, channels: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A reproducible batch: smooth images and a round lesion mask per image."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(
        torch.rand(batch, channels, size // 16, size // 16, generator=gen),
        size=(size, size),
        mode="bilinear",
    )
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    y = ((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 8) ** 2).float()
    return (x - 0.5) / 0.25, y.expand(batch, 1, size, size).contiguous()


def train_steps(cfg: Any, device: torch.device, size: int, batch: int, steps: int) -> dict:
    """``steps`` AMP training steps at ``size``: loss, autocast dtype, time, peak memory."""
    from pneumoseg.models import build_model, forward

    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(cfg).to(device, memory_format=fmt).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    x, y = batch_of(size, batch, cfg.in_channels)
    x, y = x.to(device, memory_format=fmt), y.to(device)
    losses, dtypes, times = [], set(), []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            logits, _ = forward(model, x)
            dtypes.add(str(logits.dtype).removeprefix("torch."))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    steady = times[1:] or times  # the first step pays for cuDNN's algorithm search
    return {
        "size": size,
        "batch": batch,
        "steps": steps,
        "amp": cuda,
        "channels_last": cuda,
        "losses": losses,
        "loss_finite": bool(np.isfinite(losses).all()),
        "autocast_dtype": sorted(dtypes),
        "seconds_per_image": float(np.median(steady)) / batch,
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
    }


@torch.no_grad()
def half_vs_float(cfg: Any, device: torch.device, size: int, batch: int) -> dict:
    """Probabilities of one batch in float32 and under half-precision autocast."""
    from pneumoseg.models import build_model, forward

    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    x = batch_of(size, batch, cfg.in_channels, seed=1)[0].to(device)
    full = torch.sigmoid(forward(model, x)[0].float())
    with torch.autocast(device.type, dtype=half):
        low = torch.sigmoid(forward(model, x)[0].float())
    agree = (full > 0.5) == (low > 0.5)
    return {
        "size": size,
        "half_dtype": str(half).removeprefix("torch."),
        "max_probability_difference": float((full - low).abs().max()),
        "pixels_agreeing": float(agree.float().mean()),
        "masks_identical": int(agree.flatten(1).all(dim=1).sum()),
        "masks": batch,
    }


def ddp_worker() -> None:
    """Inside ``torchrun``: one all-reduce on this rank's device; prints the result as JSON."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and os.environ.get("GPU_CHECK_DEVICE") != "cpu"
    backend = "nccl" if cuda else "gloo"
    rank = int(os.environ["RANK"])
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    dist.init_process_group(backend)
    value = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(value)
    world = dist.get_world_size()
    expected = world * (world + 1) / 2
    print(
        json.dumps({"backend": backend, "world_size": world, "ok": bool((value == expected).all())})
    )
    dist.destroy_process_group()


def ddp_one_rank(device: torch.device) -> dict:
    """A one-rank ``torchrun`` of :func:`ddp_worker` (the launcher training uses)."""
    env = dict(os.environ, GPU_CHECK_DEVICE=device.type, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "1", str(Path(__file__).resolve()), "--ddp-worker"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "returncode": proc.returncode, "error": tail, "seconds": seconds}
    return json.loads(lines[-1]) | {"seconds": seconds}


@torch.no_grad()
def predict_throughput(cfg: Any, device: torch.device, size: int, n: int, batch: int) -> dict:
    """Images per second through the prediction path against the bare model."""
    from pneumoseg.inference import Ensemble
    from pneumoseg.models import build_model, forward, save_model_file

    torch.manual_seed(0)
    model = build_model(cfg)
    meta = cfg.model_dump() | {"size": size}
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        save_model_file(path, model.state_dict(), meta)
        ensemble = Ensemble([path], tta_hflip=False, device=device, batch_size=batch)
        ensemble.predict(images[:batch])  # warm-up
        start = time.perf_counter()
        for _ in ensemble.predict_batches(enumerate(images)):
            pass
        path_seconds = time.perf_counter() - start
    bare = ensemble.models[0]
    x = batch_of(size, batch, cfg.in_channels)[0].to(device, memory_format=ensemble.memory_format)
    amp = torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")
    with amp:
        forward(bare, x)  # warm-up
    start = time.perf_counter()
    for _ in range(0, n, batch):
        with amp:
            torch.sigmoid(forward(bare, x)[0].float()).cpu()
    bare_seconds = time.perf_counter() - start
    return {
        "size": size,
        "images": n,
        "batch": batch,
        "predict_images_per_second": n / path_seconds,
        "model_only_images_per_second": n / bare_seconds,
        "ratio_to_model_only": bare_seconds / path_seconds,
    }


def run_check(device: torch.device, sizes: list[int], batch: int, steps: int, images: int) -> dict:
    """Every part of the check on ``device``; the JSON's content."""
    cfg = profile_model()
    cuda = device.type == "cuda"
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "model": {k: cfg.model_dump()[k] for k in ("arch", "encoder", "decoder_channels")},
        "train": [train_steps(cfg, device, s, batch, steps) for s in sizes],
        "half_vs_float": half_vs_float(cfg, device, sizes[-1], batch),
        "ddp": ddp_one_rank(device),
        "predict": predict_throughput(cfg, device, sizes[-1], images, batch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, default=4, help="the SIIM profile's batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--images", type=int, default=64, help="images through predict")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker()
        return
    from pneumoseg.inference import pick_device

    device = pick_device(args.device)  # a missing GPU is one line
    report = run_check(device, args.sizes, args.batch, args.steps, args.images)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for t in report["train"]:
        memory = f"{t['peak_memory_mib']:.0f} MiB" if t["peak_memory_mib"] else "n/a (CPU)"
        print(f"train {t['size']} px x{t['batch']}: loss finite {t['loss_finite']}, "
              f"autocast {t['autocast_dtype']}, {t['seconds_per_image']:.3f} s/image, "
              f"peak memory {memory}")  # fmt: skip
    h, d, p = report["half_vs_float"], report["ddp"], report["predict"]
    print(f"{h['half_dtype']} vs float32 at {h['size']} px: max |dp| "
          f"{h['max_probability_difference']:.2e}, pixels agreeing {h['pixels_agreeing']:.6f}, "
          f"{h['masks_identical']}/{h['masks']} masks identical")  # fmt: skip
    print(f"ddp: one rank on {d.get('backend', '?')}: ok {d['ok']} ({d['seconds']:.1f} s)")
    print(f"predict: {p['predict_images_per_second']:.1f} images/s vs model-only "
          f"{p['model_only_images_per_second']:.1f} = {p['ratio_to_model_only']:.2f}x")  # fmt: skip
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
