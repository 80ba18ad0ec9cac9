"""Run ``pneumoseg ARGS`` in this process and kill -9 it right after its training resume state
holds EPOCHS epochs (a deterministic kill point for the resume tests):

    python tests/kill_at.py EPOCHS train --fold 1
"""

from __future__ import annotations

import os
import signal
import sys

from pneumoseg.cli import main
from pneumoseg.training.state import ResumeStore

EPOCHS = int(sys.argv[1])
save = ResumeStore.save


def save_then_die(self: ResumeStore, state, torch_state) -> None:  # type: ignore[no-untyped-def]
    save(self, state, torch_state)
    if len(state.history) == EPOCHS:
        os.kill(os.getpid(), signal.SIGKILL)


ResumeStore.save = save_then_die  # type: ignore[method-assign]
sys.exit(main(sys.argv[2:]))
