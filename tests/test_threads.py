"""The thread rule (README "Cores"): training processes on one host share its cores; a pinned
count wins; stale registrations of dead processes do not count."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pipeline_helpers import env

from pneumoseg import threads
from pneumoseg.threads import ThreadShare, affinity_cores, fair_share, live_trainers


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> object:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def test_live_trainers_share_the_cores_and_dead_ones_are_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = affinity_cores()
    me = ThreadShare(tmp_path)
    me.register()
    assert live_trainers(tmp_path) == 1 and fair_share(tmp_path) == cores
    (tmp_path / str(dead_pid())).touch()  # a trainer killed with -9
    (tmp_path / str(__import__("os").getppid())).touch()  # another live process
    assert live_trainers(tmp_path) == 2
    assert len(list(tmp_path.iterdir())) == 2  # the dead one's file is gone
    assert fair_share(tmp_path) == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun ranks that have not registered yet
    assert fair_share(tmp_path) == max(1, cores // 4)
    me.release()
    assert not me.path.exists()


def test_a_pinned_count_wins_and_a_bad_one_names_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    share = ThreadShare(tmp_path)
    share.register()
    monkeypatch.setenv(threads.ENV, "1")
    assert share.apply() == 1 and torch.get_num_threads() == 1
    monkeypatch.delenv(threads.ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='two'"):
        share.apply()


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from pneumoseg.threads import ThreadShare

    registry, others = Path(sys.argv[1]), int(sys.argv[2])
    share = ThreadShare(registry)
    share.register()
    while len(list(registry.iterdir())) < others:  # every trainer has started
        time.sleep(0.05)
    share.apply()
    print(torch.get_num_threads(), flush=True)
    sys.stdin.readline()  # stay registered until told to go
    share.release()
    """
)


def test_two_training_processes_split_the_cores_and_one_alone_takes_them_all(
    tmp_path: Path,
) -> None:
    e = {k: v for k, v in env().items() if k not in ("OMP_NUM_THREADS", threads.ENV)}
    cmd = [sys.executable, "-c", WORKER, str(tmp_path / "registry")]
    first, second = (
        subprocess.Popen(
            [*cmd, "2"], env=e, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )  # fmt: skip
        for _ in range(2)
    )
    got = [int(p.stdout.readline()) for p in (first, second)]  # type: ignore[union-attr]
    for p in (first, second):
        p.communicate("\n", timeout=60)
    alone = subprocess.run([*cmd, "1"], env=e, input="\n", capture_output=True, text=True)
    cores = int(alone.stdout.split()[0])
    assert got == [max(1, cores // 2)] * 2
    assert cores == affinity_cores()


@pytest.mark.slow
def test_a_training_applies_the_rule_at_every_epoch_start(
    tiny_pipeline: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another trainer starts after epoch 1 of a running training: from epoch 2 on the running
    one trains with its share of the cores, not with all of them."""
    from pneumoseg.params import load_params
    from pneumoseg.training.trainer import FoldTrainer

    for name in (threads.ENV, "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(threads.REGISTRY_ENV, str(tmp_path / "trainers"))  # this test's host
    project = tiny_pipeline.copy(tmp_path / "p")  # type: ignore[attr-defined]
    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    seen: dict[int, int] = {}
    other = subprocess.Popen(["sleep", "300"])  # a live process standing for a second trainer
    registered = tmp_path / "trainers" / str(other.pid)

    def hook(row: dict) -> None:
        seen[row["epoch"]] = torch.get_num_threads()  # what this epoch trained with
        if row["epoch"] == 1:
            registered.touch()

    try:
        FoldTrainer(params, 1, progress=False, on_epoch=hook).run()
    finally:
        registered.unlink(missing_ok=True)
        other.kill()
        other.wait()
    cores = affinity_cores()
    assert seen == {1: cores, 2: max(1, cores // 2)}
