"""``train.nproc_per_node`` > 1 or ``train.nnodes`` > 1: ``pneumoseg train`` replaces itself by
torchrun running the same command in that many ranks (gloo on CPU, NCCL on GPUs; see
:mod:`.distributed`). The DVC stage command stays ``pneumoseg -q train --fold k``, so no
``dvc.yaml`` edit is needed. With several machines every machine runs that same command; they
meet at ``train.rdzv_endpoint`` (torchrun's c10d rendezvous), and global rank 0, wherever it
lands, writes the fold's files and its one MLflow run, so the machines share the project folder.
No torch import here: the launching process only execs."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence

from pneumoseg.params import Params

log = logging.getLogger("pneumoseg.train")


def rendezvous_id(argv: Sequence[str]) -> str:
    """The rendezvous id of a several-machine job: the same on every machine (they run the same
    command), another for each fold (``pneumoseg-train-fold-0``)."""
    words = [re.sub(r"[^A-Za-z0-9]+", "-", w).strip("-") for w in argv if w not in ("-q",)]
    return "-".join(["pneumoseg", *[w for w in words if w]])


def torchrun_command(
    nproc: int, argv: Sequence[str], nnodes: int = 1, endpoint: str | None = None
) -> list[str]:
    """The torchrun command that runs ``pneumoseg <argv>`` in ``nproc`` local ranks: on one
    machine ``--standalone`` (a free rendezvous port, so two jobs on one machine never collide),
    on ``nnodes`` machines the c10d rendezvous at ``endpoint``."""
    if nnodes > 1:
        if not endpoint:
            raise ValueError("train.rdzv_endpoint: needed with train.nnodes > 1")
        where = (
            f"--nnodes={nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}",
            f"--rdzv_id={rendezvous_id(argv)}",
        )
    else:
        where = ("--standalone",)
    return [
        *(sys.executable, "-m", "torch.distributed.run", *where),
        *(f"--nproc_per_node={nproc}", "-m", "pneumoseg", *argv),
    ]


def torchrun_if_asked(params: Params, argv: Sequence[str]) -> None:
    """Exec torchrun when ``train.nproc_per_node`` or ``train.nnodes`` > 1 and this is not a
    rank already (``WORLD_SIZE`` unset); otherwise return and train here."""
    cfg = params.train
    if (cfg.nproc_per_node <= 1 and cfg.nnodes <= 1) or "WORLD_SIZE" in os.environ:
        return
    command = torchrun_command(cfg.nproc_per_node, argv, cfg.nnodes, cfg.rdzv_endpoint)
    if cfg.nnodes > 1:
        log.info(
            "train.nnodes=%d: running under torchrun, meeting the other machines at %s",
            cfg.nnodes,
            cfg.rdzv_endpoint,
        )
    else:
        log.info("train.nproc_per_node=%d: running under torchrun", cfg.nproc_per_node)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
