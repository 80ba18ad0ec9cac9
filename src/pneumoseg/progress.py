"""Progress of the long loops (convert, oof, thresholds, evaluate, submit, predict, studies):
tqdm bars on a terminal, periodic lines where output goes to a log (``dvc repro`` in CI, a
redirected stderr), nothing when asked.

The mode comes from ``$PNEUMOSEG_PROGRESS`` (``bars``, ``lines`` or ``off``); without it, bars
when stderr is a terminal and the command was not given ``-q``, else lines. A line is written
when a loop starts, every ``$PNEUMOSEG_PROGRESS_SECONDS`` (default 30) and when it ends: count,
percentage, elapsed time, ETA and rate, logged at INFO (``INFO pneumoseg.progress: ...``).
``dvc.yaml`` runs the stages with ``-q``, so ``dvc repro`` shows lines, in a terminal too,
without a change of the stages' commands.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger("pneumoseg.progress")
PROGRESS_ENV = "PNEUMOSEG_PROGRESS"
INTERVAL_ENV = "PNEUMOSEG_PROGRESS_SECONDS"
MODES = ("bars", "lines", "off")
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]"


def progress_mode(bars_allowed: bool = True, stream: TextIO | None = None) -> str:
    """``bars``, ``lines`` or ``off`` (see the module docstring); ``bars_allowed`` is False
    under ``-q``. An unknown ``$PNEUMOSEG_PROGRESS`` value is a one-line error."""
    chosen = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if chosen:
        if chosen not in MODES:
            raise ValueError(f"{PROGRESS_ENV}={chosen!r}: expected one of {', '.join(MODES)}")
        return chosen
    stream = stream or sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return "bars" if bars_allowed and interactive else "lines"


class _Lines(io.TextIOBase):
    """A file for tqdm that turns each carriage-return refresh into one INFO log line of
    ``pneumoseg.progress`` (stderr, like every progress and warning line of the CLI)."""

    def __init__(self) -> None:
        self.last = ""

    def write(self, text: str) -> int:
        for piece in text.replace("\n", "\r").split("\r"):
            piece = piece.strip()
            if piece and piece != self.last:
                log.info("%s", piece)
                self.last = piece
        return len(text)


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "img",
    bars_allowed: bool = True,
    inner: bool = False,
) -> tqdm:
    """A tqdm over ``iterable`` (or updated by hand with ``total``) in the current mode.
    ``inner``: a loop inside a loop that logs its own lines (training batches): a bar on a
    terminal, nothing otherwise."""
    mode = progress_mode(bars_allowed)
    if mode == "bars":
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=not inner)
    if mode == "off" or inner:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    interval = float(os.environ.get(INTERVAL_ENV, "30") or 30)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(),
        mininterval=interval,
        maxinterval=max(interval, 10.0),
        miniters=1,
        ascii=True,
        bar_format=LINE_FORMAT if total is not None or hasattr(iterable, "__len__") else None,
    )
