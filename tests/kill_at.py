"""Run ``pneumoseg ARGS`` in this process and send it SIGNAL right after its training resume
state holds EPOCHS epochs (a deterministic interruption point for the resume tests):

    python tests/kill_at.py EPOCHS [SIGKILL|SIGTERM|SIGINT] train --fold 1
"""

from __future__ import annotations

import os
import signal
import sys

from pneumoseg.cli import main
from pneumoseg.training.state import ResumeStore

EPOCHS = int(sys.argv[1])
SIGNAL = signal.Signals[sys.argv[2]] if sys.argv[2].startswith("SIG") else signal.SIGKILL
ARGS = sys.argv[3:] if sys.argv[2].startswith("SIG") else sys.argv[2:]
save = ResumeStore.save


def save_then_signal(self: ResumeStore, state, torch_state) -> None:  # type: ignore[no-untyped-def]
    save(self, state, torch_state)
    if len(state.history) == EPOCHS:
        os.kill(os.getpid(), SIGNAL)


ResumeStore.save = save_then_signal  # type: ignore[method-assign]
if SIGNAL == signal.SIGINT:  # a Ctrl-C at a terminal, also when the runner is a background job
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (which starts with SIGINT ignored)
sys.exit(main(ARGS))
