"""kill -9 mid-work in every stage after training, two registers at once, a promote during a
register, and a full disk while training saves its checkpoints or oof writes its maps.

Each stage is killed at a seeded random moment after the first line of its work (its first
progress line: imports done) and before its end, then rerun; the rerun's outputs are compared
with its clean run's, and no MLflow run of the stage may stay RUNNING.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import Pipeline, deep_update, env, in_process, pin_threads, set_params

from .test_faults import (
    SEEDS,
    fault_mid_work,
    interrupt_training,
    pneumoseg,
    same_weights,
    small_disk,
    stopped_by_full_disk,
    tree_digest,
)

pytestmark = [pytest.mark.slow, pytest.mark.faults]

Record = Callable[[str, str, str, bool], None]
STAGES = ("oof", "thresholds", "evaluate", "register", "submit", "predict")
# numbers that differ by design between two runs: run ids, timings, where a file came from
VOLATILE = {"mlflow_run_id", "run_id", "logged_model_uri", "seconds", "storage"}
KILL_SEEDS = max(1, SEEDS // 3)  # default 1 per stage; make faults: 3


def stable(data: object) -> object:
    """``data`` without the :data:`VOLATILE` keys (at any depth)."""
    if isinstance(data, dict):
        return {k: stable(v) for k, v in data.items() if k not in VOLATILE}
    if isinstance(data, list):
        return [stable(v) for v in data]
    return data


def client(project: Path):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project}/mlruns/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def stage_runs(project: Path, stage: str) -> list:  # type: ignore[type-arg]
    c = client(project)
    ids = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(ids, f"tags.stage = '{stage}'")


def predict_args(project: Path) -> list[str]:
    dicoms = sorted((project / "data/raw/demo").rglob("*.dcm"))  # all 30: ~3 s of work
    return ["predict", "--model", "models", "--input", *map(str, dicoms), "--out", "pred"]


def outputs(project: Path, stage: str) -> object:
    """What a stage wrote, in a form two clean runs agree on."""
    if stage == "oof":
        return tree_digest(project / "oof")
    if stage == "submit":
        return tree_digest(project / "submission")
    if stage == "predict":
        return tree_digest(project / "pred")
    path = {
        "thresholds": "models/postprocess.json",
        "evaluate": "metrics/evaluate.json",
        "register": "metrics/registered.json",
    }[stage]
    return stable(json.loads((project / path).read_text()))


def command(project: Path, stage: str) -> list[str]:
    return predict_args(project) if stage == "predict" else [stage]


def prepare(project: Path, stage: str) -> None:
    """Make the stage's rerun start from nothing where it keeps state between runs."""
    if stage == "thresholds":  # a fresh study, as in the clean run
        shutil.rmtree(project / "optuna")
    if stage == "register":  # the clean run made version 1 of a new registered model
        client(project).delete_registered_model("pneumoseg")


def start(project: Path, args: list[str]) -> subprocess.Popen:  # type: ignore[type-arg]
    return subprocess.Popen(
        [sys.executable, "-m", "pneumoseg", "-q", *args],
        cwd=project,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def predicted(tiny_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> object:
    """The clean run of ``predict`` (the tiny pipeline has none) and how long it worked after
    its first progress line (a kill's delay is a fraction of that: the work of a few seconds
    is short next to the imports, and a fraction of the whole run missed it three times on a
    loaded CI machine)."""
    project = tiny_pipeline.copy(tmp_path_factory.mktemp("predict") / "p")
    _, done, worked = fault_mid_work(project, predict_args(project), MARKERS["predict"], None)
    assert done.returncode == 0, done.stderr[-2000:]
    return outputs(project, "predict"), worked


# each stage's first line once its work has begun (imports done): a progress bar's first line,
# register's packaging line
MARKERS = {
    "oof": "pneumoseg.progress: oof: ",
    "thresholds": "pneumoseg.progress: thresholds: ",
    "evaluate": "pneumoseg.progress: evaluate: ",
    "register": "register: packaging",
    "submit": "pneumoseg.progress: submit: ",
    "predict": "pneumoseg.progress: predict: ",
}


@pytest.mark.parametrize("seed", range(KILL_SEEDS))
@pytest.mark.parametrize("stage", STAGES)
def test_kill_9_mid_work_then_rerun(
    tiny_pipeline: Pipeline,
    predicted: tuple[object, float],
    tmp_path: Path,
    stage: str,
    seed: int,
    record: Record,
) -> None:
    project = tiny_pipeline.copy(tmp_path / "p")
    if stage == "predict":
        clean, seconds = predicted
    else:
        clean, seconds = outputs(project, stage), tiny_pipeline.reports[stage]["wall_seconds"]
    prepare(project, stage)
    rng = random.Random(f"{stage}{seed}")
    # a random point of the work (past the first line of the stage's work, before its end);
    # when the stage finished first (a fast machine), once more, sooner
    for fraction in (rng.uniform(0.05, 0.6), rng.uniform(0.0, 0.05), 0.0):
        landed, proc, _ = fault_mid_work(
            project, command(project, stage), MARKERS[stage], seconds * fraction
        )
        if landed:
            break
        prepare(project, stage)
    killed = proc.returncode == -9
    rerun = in_process("-q", *command(project, stage), cwd=project, check=False)
    left_running = [r.info.run_id for r in stage_runs(project, stage) if r.info.status == "RUNNING"]
    leftovers = [p.name for p in project.glob(".*.*") if p.is_dir()]  # staged folders
    versions = [] if stage != "register" else client(project).search_model_versions()
    held = (
        killed
        and rerun.returncode == 0
        and outputs(project, stage) == clean
        and not left_running
        and not leftovers
        and (stage != "register" or len(versions) == 1)
    )
    what = "rerun identical to a clean run, no run left RUNNING"
    if stage == "register":
        what = "rerun gives one version like a clean run, no run left RUNNING"
    if stage == "thresholds":
        what = "the resumed study selects the clean run's triplet, no run left RUNNING"
    record("kill -9 mid-work", stage, what, held, landed)
    assert landed and held, (killed, left_running, leftovers, len(versions), rerun.stderr[-2000:])


# ------------------------------------------------------------------------- concurrency
def test_promotes_during_a_register_lose_no_update(
    tiny_pipeline: Pipeline, tmp_path: Path, record: Record
) -> None:
    """Two promotes and a register started together: the registry lock orders them, so the
    champion history holds both promotions and the challenger is the new version; a second
    register of the same model makes no duplicate version."""
    project = tiny_pipeline.copy(tmp_path / "p")
    shutil.copy(project / "params.yaml", project / "v2.yaml")
    set_params(project, {"oof": {"batch_size": 3}})  # a different package each: new versions
    v2 = project / "v2.yaml"
    v2.write_text(v2.read_text().replace("out: metrics/registered.json", "out: v2.json"))
    set_params_file(v2, {"oof": {"batch_size": 2}})
    assert pneumoseg(project, "-q", "--params", "v2.yaml", "register").returncode == 0
    procs = [
        start(project, ["models", "promote", "1"]),
        start(project, ["models", "promote", "2"]),
        start(project, ["register"]),
    ]
    codes = [p.wait(timeout=600) for p in procs]
    again = pneumoseg(project, "-q", "register")
    c = client(project)
    versions = sorted(int(v.version) for v in c.search_model_versions("name = 'pneumoseg'"))
    model = c.get_registered_model("pneumoseg")
    history = json.loads(model.tags.get("champion_history", "[]"))
    held = (
        codes == [0, 0, 0]
        and again.returncode == 0
        and "already holds this exact model" in again.stdout  # no duplicate
        and versions == [1, 2, 3]
        and sorted(history) == ["1", "2"]
        and str(model.aliases["champion"]) == history[-1]
        and str(model.aliases["challenger"]) == "3"
    )
    record("two `models promote` during a `register`, then the same register again",
           "register", "no lost alias or history entry, no duplicate version", held)  # fmt: skip
    assert held, (codes, versions, model.aliases, history, again.stdout)


# ---------------------------------------------------------------------------- full disk
def set_params_file(path: Path, overrides: dict) -> None:  # type: ignore[type-arg]
    path.write_text(yaml.safe_dump(deep_update(yaml.safe_load(path.read_text()), overrides)))


def test_a_full_disk_while_saving_checkpoints_stops_training_cleanly(
    tiny_pipeline: Pipeline, tmp_path: Path, record: Record, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_threads(monkeypatch)  # bit-for-bit with the tiny pipeline's (pinned) weights
    project = tiny_pipeline.copy(tmp_path / "p")
    shutil.rmtree(project / "checkpoints", ignore_errors=True)
    assert interrupt_training(project, 1, "SIGKILL").returncode == -9  # one epoch saved
    state = project / "checkpoints/fold0"
    used = sum(p.stat().st_size for p in state.rglob("*") if p.is_file())
    with small_disk(state, used + used // 2, tmp_path / "state.real") as real:
        shutil.copytree(real, state, dirs_exist_ok=True)
        full = pneumoseg(project, "-q", "train", "--fold", "0")
        kept = [p.name for p in state.glob("*.pt")]
    rerun = in_process("-q", "train", "--fold", "0", cwd=project, check=False)
    held = (
        stopped_by_full_disk(full)
        and "last.pt" in kept
        and rerun.returncode == 0
        and same_weights(project, tiny_pipeline.path)  # the clean run's weights
    )
    record("disk full", "train (checkpoints)", "one line, resume state intact, rerun gives "
           "identical weights", held)  # fmt: skip
    assert held, full.stderr[-2000:]


def test_a_full_disk_in_arrays_is_one_line_not_a_sigbus(
    tiny_pipeline: Pipeline, tmp_path: Path, record: Record
) -> None:
    """arrays writes through memory maps: on a full disk a write into a map is a SIGBUS (exit
    135, no message, the staging folder left), unless the space is claimed up front."""
    project = tiny_pipeline.copy(tmp_path / "p")
    clean = tree_digest(project / "data/arrays")
    box = project / "box"  # arrays.out_dir inside a small disk: the arrays and their staging
    box.mkdir()
    shutil.move(str(project / "data/arrays"), str(box / "arrays"))
    set_params(project, {"arrays": {"out_dir": "box/arrays", "sizes": [64, 96]}})
    used = sum(p.stat().st_size for p in (box / "arrays").rglob("*"))
    with small_disk(box, used + used // 2, tmp_path / "box.real") as real:
        shutil.copytree(real, box, dirs_exist_ok=True)
        full = pneumoseg(project, "-q", "arrays")  # needs twice the space: 64 and 96 px
        kept = tree_digest(box / "arrays") == clean
        staging = sorted(p.name for p in box.iterdir() if p.name.startswith("."))
    held = stopped_by_full_disk(full) and kept and not staging
    record("disk full", "arrays", "one line (no SIGBUS), previous arrays intact, no staging "
           "folder left", held)  # fmt: skip
    assert held, (full.returncode, staging, full.stderr[-2000:])


def test_a_full_disk_in_oof_keeps_the_previous_maps(
    tiny_pipeline: Pipeline, tmp_path: Path, record: Record
) -> None:
    project = tiny_pipeline.copy(tmp_path / "p")
    clean = tree_digest(project / "oof")
    box = project / "box"  # oof.out_dir inside a small disk: the maps and their staging folder
    box.mkdir()
    shutil.move(str(project / "oof"), str(box / "oof"))
    set_params(project, {"oof": {"out_dir": "box/oof"}})
    used = sum(p.stat().st_size for p in (box / "oof").rglob("*"))
    with small_disk(box, used + used // 3, tmp_path / "box.real") as real:
        shutil.copytree(real, box, dirs_exist_ok=True)
        full = pneumoseg(project, "-q", "oof")
        kept = tree_digest(box / "oof") == clean
    rerun = in_process("-q", "oof", cwd=project, check=False)
    held = (
        stopped_by_full_disk(full)
        and kept
        and rerun.returncode == 0
        and tree_digest(box / "oof") == clean
    )
    record("disk full", "oof", "one line, previous maps intact, rerun identical", held)
    assert held, full.stderr[-2000:]


def test_a_full_disk_in_pseudo_label_keeps_the_previous_labels(
    tiny_pipeline: Pipeline, tmp_path: Path, record: Record
) -> None:
    """pseudo_label streams the kept images and masks into memory maps (a scratch pair, then
    the arrays' layout). A disk without room for the scratch maps is one line (their space is
    claimed up front; a write into an unclaimed map page would be a SIGBUS), the previous labels
    stay whole, no staging folder is left, and a rerun with space writes the same labels."""
    project = tiny_pipeline.copy(tmp_path / "p")
    clean = tree_digest(project / "data/pseudo")
    box = project / "box"  # pseudo_label.out_dir inside a small disk
    box.mkdir()
    shutil.move(str(project / "data/pseudo"), str(box / "pseudo"))
    set_params(project, {"pseudo_label": {"out_dir": "box/pseudo"}})
    files = [p for p in (box / "pseudo").rglob("*") if p.is_file()]
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in files)  # tmpfs: whole pages
    room = 6 * 4096  # less than one scratch map (6 test images of 64 x 64 px and a header)
    with small_disk(box, used + room, tmp_path / "box.real") as real:
        shutil.copytree(real, box, dirs_exist_ok=True)
        full = pneumoseg(project, "-q", "pseudo_label", "--fold", "0")
        kept = tree_digest(box / "pseudo") == clean
        staging = sorted(p.name for p in (box / "pseudo").iterdir() if p.name.startswith("."))
    rerun = in_process("-q", "pseudo_label", "--fold", "0", cwd=project, check=False)
    held = (
        stopped_by_full_disk(full)
        and kept
        and not staging
        and rerun.returncode == 0
        and tree_digest(box / "pseudo") == clean
    )
    record("disk full", "pseudo_label", "one line (no SIGBUS), previous labels intact, rerun "
           "identical", held)  # fmt: skip
    assert held, (full.returncode, staging, full.stderr[-2000:])
