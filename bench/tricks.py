"""What each training trick costs (README "Tricks"): peak memory and step time of one training
step with the trick against the plain model of params.yaml, in the same run (CPU, default
threads). Gradient checkpointing is the one trick meant to save memory.

Each configuration runs in a fresh process: the model, an Adam optimizer and a random batch are
built and the resident set size is read; then one untimed warm-up step and ``--steps`` timed
steps (forward, bce + dice loss, backward, optimizer step, and the EMA update for ``ema``) run.
"peak RSS" is the process's ``ru_maxrss``; "a step's memory" is that peak minus the size before
the first step (the activations kept for the backward pass, plus Adam's state, a few MB).
Ratios are trick / plain.

    .venv/bin/python bench/tricks.py [--sizes 256 512 1024] [--batch 8 4 2] [--tricks ...]
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
TRICKS = ("plain", "grad_checkpointing", "scse", "group", "ema")


def measure(size: int, batch: int, trick: str, steps: int) -> dict[str, float]:
    """One configuration, in this process (called in a child)."""
    import torch

    from pneumoseg.layers import enable_grad_checkpointing
    from pneumoseg.losses import ComboLoss
    from pneumoseg.models import build_model
    from pneumoseg.params import LossParams, load_params
    from pneumoseg.training.parts import make_ema

    torch.manual_seed(0)
    cfg = load_params(ROOT / "params.yaml").train.model
    if trick == "scse":
        cfg = cfg.model_copy(update={"decoder_attention": "scse"})
    if trick == "group":
        cfg = cfg.model_copy(update={"norm": "group"})
    model = build_model(cfg).train()
    if trick == "grad_checkpointing":
        enable_grad_checkpointing(model)
    ema = make_ema(model, 0.99) if trick == "ema" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = ComboLoss(LossParams())
    x = torch.randn(batch, cfg.in_channels, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.9).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)

    page = os.sysconf("SC_PAGE_SIZE")
    before = int(Path("/proc/self/statm").read_text().split()[1]) * page
    step()  # warm-up (untimed): optimizer state allocated, allocator warmed
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": seconds, "peak_mb": peak / 2**20, "above_mb": (peak - before) / 2**20}


def child(size: int, batch: int, trick: str, steps: int) -> dict[str, float]:
    args = [sys.executable, __file__, "--child", str(size), str(batch), trick]
    out = subprocess.run([*args, "--steps", str(steps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--tricks", nargs="+", default=list(TRICKS[1:]), choices=TRICKS[1:])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, batch, trick = args.child
        print(json.dumps(measure(int(size), int(batch), trick, args.steps)))
        return
    print(
        "size batch trick              | peak RSS MB | a step's memory MB (ratio) | step s (ratio)"
    )
    for size, batch in zip(args.sizes, args.batch, strict=True):
        plain = child(size, batch, "plain", args.steps)
        for trick in ["plain", *args.tricks]:
            got = plain if trick == "plain" else child(size, batch, trick, args.steps)
            memory, speed = got["above_mb"] / plain["above_mb"], got["step_s"] / plain["step_s"]
            print(
                f"{size:4d} {batch:5d} {trick:18s} | {got['peak_mb']:11.0f} | "
                f"{got['above_mb']:7.0f} ({memory:.2f}) | {got['step_s']:.3f} ({speed:.2f}x)"
            )


if __name__ == "__main__":
    main()
