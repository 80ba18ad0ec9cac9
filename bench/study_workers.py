"""Trials per hour of a training study on PostgreSQL with one and two ``pneumoseg study run``
workers on this machine (issues "team scale-out" and "compute that scales").

The same study definition (two searched keys, a fixed epoch budget, no pruner) runs to the same
trial count three times, each in a fresh study of one PostgreSQL database (Debian's server on
127.0.0.1, started as the tests start it):

- ``1 worker``: one process, threads by pneumoseg's rule (alone: every core; the baseline);
- ``2 workers, the rule``: two processes, threads by the rule (README "Cores": they register
  as trainers on this host and split the cores), nothing set by hand;
- ``2 workers, every core each`` (``--thrash``): two processes pinned to every core
  (``PNEUMOSEG_THREADS`` = cores), what torch's default did before the rule.

Trials per hour count the trials finished (COMPLETE) over the wall time from the workers' start
to the last one's exit (process start-up included, as a user pays it). Run on an idle machine:

    .venv/bin/python bench/study_workers.py [--trials 8] [--epochs 4] [--size 128] [--thrash]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from engines import running_postgres  # noqa: E402
from pipeline_helpers import BIN, env, make_project, run, set_params  # noqa: E402

SPACE = {
    "train.parts[0].lr": {"type": "float", "low": 1e-4, "high": 0.01, "log": True},
    "train.parts[0].loss.bce": {"type": "float", "low": 0.5, "high": 2},
}


def study(epochs: int, trials: int, size: int | None) -> dict:
    budget = {"train.parts[0].epochs": epochs} | ({"train.parts[0].size": size} if size else {})
    return {
        "space": SPACE,
        "budget": budget,
        "metric": "val_loss",
        "direction": "minimize",
        "trials": trials,
        "seed": 3,
        "pruner": {"name": "none"},
    }


def workers(project: Path, name: str, storage: str, threads: list[int | None]) -> float:
    """Wall seconds for ``len(threads)`` workers (``None``: the thread rule; a number: pinned)
    to bring study ``name`` to its trial count."""
    procs = []
    t0 = time.perf_counter()
    for n in threads:
        variables = env() | {"PNEUMOSEG_OPTUNA_STORAGE": storage}
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PNEUMOSEG_THREADS"):
            variables.pop(key, None)
        if n is not None:
            variables["PNEUMOSEG_THREADS"] = str(n)
        cmd = [sys.executable, "-m", "pneumoseg", "-q", "study", "run", name]
        output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        procs.append(subprocess.Popen(cmd, cwd=project, env=variables, **output))
    for p in procs:
        out = p.communicate()[0]
        if p.returncode:
            raise SystemExit(f"worker of {name} exited {p.returncode}:\n{out[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, help="training size (default: the tiny params')")
    parser.add_argument("--thrash", action="store_true", help="also two default-thread workers")
    parser.add_argument(
        "--project",
        type=Path,
        help="a project whose data stages ran (a copy is used; default: a new tiny project)",
    )
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    configs: dict[str, list[int | None]] = {"1 worker": [None], "2 workers, the rule": [None] * 2}
    if args.thrash:
        configs["2 workers, every core each"] = [cores, cores]
    tmp = Path(tempfile.mkdtemp(prefix="pneumoseg-bench-studies-"))
    if args.project:
        project = Path(shutil.copytree(args.project, tmp / "p", symlinks=True))
    else:
        project = make_project(tmp / "p")
    definition = study(args.epochs, args.trials, args.size)
    names = {label: f"bench{i}" for i, label in enumerate(configs)}
    set_params(project, {"studies": {name: definition for name in names.values()}})
    if not args.project:
        run([str(BIN / "dvc"), "repro", "split", "arrays"], cwd=project)  # what trials read
    with running_postgres() as pg:
        storage = pg.create_database("studies", "optuna", "bench-pw")
        import optuna

        from pneumoseg.studies.storage import open_storage

        size = f"{args.size} px" if args.size else "tiny size"
        print(f"{args.trials} trials of {args.epochs} epochs at {size} (fold 0), {cores} cores")
        print(f"{'':28} {'threads':>15} {'wall s':>8} {'trials/h':>9} {'vs 1 worker':>12}")
        base = None
        for label, threads in configs.items():
            seconds = workers(project, names[label], storage, threads)
            done = optuna.load_study(study_name=names[label], storage=open_storage(storage))
            finished = sum(t.state.name == "COMPLETE" for t in done.trials)
            per_hour = finished * 3600 / seconds
            base = base or per_hour
            shown = "/".join("rule" if n is None else f"pinned {n}" for n in threads)
            print(f"{label:28} {shown:>15} {seconds:8.1f} {per_hour:9.1f} {per_hour / base:11.2f}x")


if __name__ == "__main__":
    main()
