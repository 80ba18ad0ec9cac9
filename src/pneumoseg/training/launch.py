"""``train.nproc_per_node`` > 1: ``pneumoseg train`` replaces itself by torchrun running the same
command in that many ranks (gloo on CPU, NCCL on GPUs; see :mod:`.distributed`). The DVC stage
command stays ``pneumoseg -q train --fold k``, so no ``dvc.yaml`` edit is needed. No torch
import here: the launching process only execs."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from pneumoseg.params import Params

log = logging.getLogger("pneumoseg.train")


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command that runs ``pneumoseg <argv>`` in ``nproc`` local ranks
    (``--standalone``: a free rendezvous port, so two jobs on one machine never collide)."""
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *(f"--nproc_per_node={nproc}", "-m", "pneumoseg", *argv),
    ]


def torchrun_if_asked(params: Params, argv: Sequence[str]) -> None:
    """Exec torchrun when ``train.nproc_per_node`` > 1 and this is not a rank already
    (``WORLD_SIZE`` unset); otherwise return and train here."""
    nproc = params.train.nproc_per_node
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return
    command = torchrun_command(nproc, argv)
    log.info("train.nproc_per_node=%d: running under torchrun", nproc)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
