"""Gradient checkpointing (``train.grad_checkpointing``): peak memory and step time with and
without it, on the model of params.yaml (CPU, default threads).

Each configuration runs in a fresh process: the model, an Adam optimizer and a random batch are
built and the resident set size is read; then one untimed warm-up step and ``--steps`` timed
steps (forward, bce + dice loss, backward, optimizer step) run. "peak RSS" is the process's
``ru_maxrss``; "a step's memory" is that peak minus the size before the first step (the
activations kept for the backward pass, plus Adam's state, a few MB). Ratios are on / off.

    .venv/bin/python bench/grad_checkpointing.py [--sizes 256 512 1024] [--batch 8 4 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(size: int, batch: int, checkpointing: bool, steps: int) -> dict[str, float]:
    """One configuration, in this process (called in a child)."""
    import torch

    from pneumoseg.layers import enable_grad_checkpointing
    from pneumoseg.losses import ComboLoss
    from pneumoseg.models import build_model
    from pneumoseg.params import LossParams, load_params

    torch.manual_seed(0)
    cfg = load_params(ROOT / "params.yaml").train.model
    model = build_model(cfg).train()
    if checkpointing:
        enable_grad_checkpointing(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = ComboLoss(LossParams())
    x = torch.randn(batch, cfg.in_channels, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.9).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    page = os.sysconf("SC_PAGE_SIZE")
    before = int(Path("/proc/self/statm").read_text().split()[1]) * page
    step()  # warm-up (untimed): optimizer state allocated, allocator warmed
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": seconds, "peak_mb": peak / 2**20, "above_mb": (peak - before) / 2**20}


def child(size: int, batch: int, checkpointing: bool, steps: int) -> dict[str, float]:
    args = [sys.executable, __file__, "--child", str(size), str(batch), str(int(checkpointing))]
    out = subprocess.run([*args, "--steps", str(steps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, batch, on = args.child
        print(json.dumps(measure(size, batch, bool(on), args.steps)))
        return
    print("size batch | peak RSS off/on MB | a step's memory off/on MB (ratio) | step s off/on")
    for size, batch in zip(args.sizes, args.batch, strict=True):
        off, on = (child(size, batch, c, args.steps) for c in (False, True))
        memory = on["above_mb"] / off["above_mb"]
        print(
            f"{size:4d} {batch:5d} | {off['peak_mb']:7.0f} / {on['peak_mb']:7.0f} | "
            f"{off['above_mb']:7.0f} / {on['above_mb']:7.0f} ({memory:.2f})"
            f" | {off['step_s']:.3f} / {on['step_s']:.3f} ({on['step_s'] / off['step_s']:.2f}x)"
        )


if __name__ == "__main__":
    main()
