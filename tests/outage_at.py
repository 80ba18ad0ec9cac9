"""Run ``pneumoseg ARGS`` in this process; the MLflow store goes away after the training's
resume state holds DOWN epochs and comes back after UP (0: never), by creating and removing the
flag file ``$PNEUMOSEG_OUTAGE_FLAG`` that the test's proxy in front of the store obeys (a
deterministic outage for the tracking-outage tests):

    python tests/outage_at.py DOWN UP train --fold 0
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pneumoseg.cli import main
from pneumoseg.training.state import ResumeStore

DOWN, UP = int(sys.argv[1]), int(sys.argv[2])
FLAG = Path(os.environ["PNEUMOSEG_OUTAGE_FLAG"])
save = ResumeStore.save


def save_then_switch(self: ResumeStore, state, torch_state) -> None:  # type: ignore[no-untyped-def]
    save(self, state, torch_state)
    if len(state.history) == DOWN:
        FLAG.touch()
    if len(state.history) == UP:
        FLAG.unlink(missing_ok=True)


ResumeStore.save = save_then_switch  # type: ignore[method-assign]
sys.exit(main(sys.argv[3:]))
