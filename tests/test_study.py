"""Optuna training studies: schema, in-place params edits, and real studies on a tiny project
(pruning, continuation, parallel workers, a killed worker, seeds, MLflow nesting, apply)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pipeline_helpers import ROOT, Pipeline, env, in_process, pneumoseg, run, set_params

from pneumoseg.params import ParamsError, load_params
from pneumoseg.studies.config import make_sampler, mlflow_key, parse_duration
from pneumoseg.studies.yaml_edit import edit_yaml_scalars

LR = "train.parts[0].lr"
BCE = "train.parts[0].loss.bce"
TINY_STUDY = {
    "space": {
        LR: {"type": "float", "low": 1e-4, "high": 0.01, "log": True},
        BCE: {"type": "float", "low": 0.5, "high": 2},
    },
    "budget": {"train.parts[0].epochs": 2},
    "metric": "val_loss",
    "direction": "minimize",
    "trials": 2,
    "seed": 3,
    "pruner": {"name": "median", "startup_trials": 2, "warmup_epochs": 0},
}
# A longer trial for the kill test (time to kill it mid-training).
SHAPE = "train.parts[0].sample_rate.shape"
SLOW_STUDY = TINY_STUDY | {"budget": {"train.parts[0].epochs": 12}, "pruner": {"name": "none"}}


# ------------------------------------------------------------------------------ fast tests
def test_parse_duration_and_keys() -> None:
    assert parse_duration("2h") == 7200
    assert parse_duration("30m") == 1800
    assert parse_duration("90") == 90
    assert parse_duration(None) is None
    with pytest.raises(ValueError, match="--timeout '2 days'"):
        parse_duration("2 days")
    assert mlflow_key("train.parts[1].loss.bce") == "train.parts.1.loss.bce"


def _with_study(tmp_path: Path, study: dict[str, Any]) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["studies"] = {"s": study}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("study", "message"),
    [
        (
            {"space": {"train.parts[0].loss.bcx": {"type": "float", "low": 0, "high": 1}}},
            r"studies\.s\.space\.train\.parts\[0\]\.loss\.bcx: not a params key",
        ),
        (
            {"space": {"train.parts[3].lr": {"type": "float", "low": 0.1, "high": 1}}},
            r"train\.parts\[3\]\.lr: not a params key",
        ),
        (
            {"space": {"train.parts[0].sample_rate.start": {"type": "float", "low": 0, "high": 1}}},
            r"sample_rate\.start: value 0\.0 is invalid \(.*must be > 0\)",
        ),
        (
            {"space": {SHAPE: {"type": "categorical", "choices": [1]}}},
            r"sample_rate\.shape: value 1 is invalid",
        ),
        (
            {"space": {LR: {"type": "float", "low": 0, "high": 1, "log": True}}},
            r"lr\.low: must be > 0 with log: true",
        ),
        ({"space": {"data.size": {"type": "int", "low": 64, "high": 96}}}, r"only train\.\*"),
        (
            {"space": {BCE: {"type": "float", "low": 1, "high": 2}}, "budget": {"train.epochs": 2}},
            r"studies\.s\.budget\.train\.epochs: not a params key",
        ),
        ({"space": {BCE: {"type": "float", "low": 1, "high": 2}}, "folds": [7]}, r"folds: \[7\]"),
    ],
)
def test_study_schema_names_the_bad_key(tmp_path: Path, study: dict, message: str) -> None:
    path = _with_study(tmp_path, study)
    with pytest.raises(ParamsError, match=r"^params\.yaml: .*" + message):
        load_params(path)


def test_edit_yaml_scalars_changes_exactly_the_targeted_values() -> None:
    text = (ROOT / "params.yaml").read_text()
    values = {
        BCE: 2.75,
        "train.parts[0].loss.focal": 1.5,
        "train.parts[0].sample_rate.shape": "step",
        "train.parts[0].sample_rate.end": 1 / 3,
        "train.model.encoder": "resnet34",
    }
    new, changes = edit_yaml_scalars(text, values)
    old_lines, new_lines = text.splitlines(), new.splitlines()
    assert len(old_lines) == len(new_lines)
    changed = [i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b]
    assert 1 <= len(changed) <= len(values)
    for i in changed:  # comments and the rest of each changed line survive
        assert old_lines[i].partition("#")[2] == new_lines[i].partition("#")[2]
    before, after = yaml.safe_load(text), yaml.safe_load(new)
    for key, value in values.items():
        from pneumoseg.params import get_path, set_path

        assert get_path(after, key) == value
        set_path(before, key, value)
    assert before == after  # nothing else moved
    assert [c[0] for c in changes] == list(values)


def test_edit_yaml_scalars_refuses_missing_keys_and_block_mappings() -> None:
    text = "train:\n  parts:\n    - size: 64\n      loss: {bce: 1}  # flow\n"
    with pytest.raises(ValueError, match=r"train\.parts\[0\]\.loss\.dice is not written"):
        edit_yaml_scalars(text, {"train.parts[0].loss.dice": 2.0})
    with pytest.raises(ValueError, match=r"train\.parts\[0\] is a mapping or list over sev"):
        edit_yaml_scalars(text, {"train.parts[0]": {"size": 32}})
    new, _ = edit_yaml_scalars(text, {"train.parts[0].loss.bce": 0.5})
    assert new == text.replace("bce: 1", "bce: 0.5")
    # a one-line flow collection is replaced whole, its comment kept
    new, _ = edit_yaml_scalars(text, {"train.parts[0].loss": {"bce": 2, "dice": 1}})
    assert new == text.replace("{bce: 1}", "{bce: 2, dice: 1}")


def test_grid_sampler_needs_steps(tmp_path: Path) -> None:
    study = {"space": {BCE: {"type": "float", "low": 1, "high": 2}}, "sampler": "grid"}
    cfg = load_params(_with_study(tmp_path, study)).studies["s"]
    with pytest.raises(ValueError, match="grid: train.parts\\[0\\].loss.bce needs a step"):
        make_sampler(cfg, 0)
    study["space"][BCE]["step"] = 0.5
    cfg = load_params(_with_study(tmp_path, study)).studies["s"]
    assert make_sampler(cfg, 0)._search_space == {BCE: [1.0, 1.5, 2.0]}


# ------------------------------------------------------------------------------ real studies
@pytest.fixture(scope="module")
def base(tiny_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    overrides = {"studies": {"tiny": TINY_STUDY, "slow": SLOW_STUDY}}
    project = tiny_pipeline.copy(tmp_path_factory.mktemp("study") / "base")
    set_params(project, overrides)
    return project


@pytest.fixture(scope="module")
def studied(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base project after `pneumoseg study run tiny` (its 2 trials)."""
    project = shutil.copytree(base, tmp_path_factory.mktemp("studied") / "p")
    in_process("-q", "study", "run", "tiny", cwd=project)
    return project


def one_thread_env() -> dict[str, str]:
    """Concurrent torch processes on a small machine: one thread each (no oversubscription)."""
    return env() | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def load(project: Path, name: str, storage: str | None = None) -> Any:
    import optuna

    from pneumoseg.studies.storage import open_storage

    storage = storage or str(project / "optuna/journal.log")
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def dashboard_get(storage: Path, path: str) -> Any:
    """``GET path`` of optuna-dashboard's app (its WSGI entry) on ``storage``: the JSON."""
    import io

    from optuna_dashboard import wsgi

    from pneumoseg.studies.storage import open_storage

    app = wsgi(open_storage(str(storage)))
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "wsgi.input": io.BytesIO(),
               "wsgi.url_scheme": "http"}  # fmt: skip
    status: list[str] = []
    body = b"".join(app(environ, lambda code, headers, exc=None: status.append(code)))
    assert status == ["200 OK"], (status, body[:300])
    return json.loads(body)


def mlflow_runs(project: Path) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("pneumoseg-studies")
    return {"client": client, "runs": client.search_runs([exp.experiment_id])}


@pytest.mark.slow
def test_study_prunes_continues_tracks_shows_and_applies(studied: Path, tmp_path: Path) -> None:
    import optuna

    project = shutil.copytree(studied, tmp_path / "p")
    study = load(project, "tiny")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    # A deliberately bad trial (lr 10 diverges at once: a NaN loss in its first epoch) is
    # pruned there, before it reports anything, and the worker goes on.
    study.enqueue_trial({LR: 10.0, BCE: 1.0})
    in_process("-q", "study", "run", "tiny", "--trials", "3", cwd=project)
    study = load(project, "tiny")
    states = [t.state for t in study.trials]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2
    assert states[2] == optuna.trial.TrialState.PRUNED
    assert study.trials[2].params[LR] == 10.0
    assert study.trials[2].intermediate_values == {}  # stopped in epoch 1 of 2
    # The study is complete: running again starts no trial.
    in_process("-q", "study", "run", "tiny", "--trials", "3", cwd=project)
    assert len(load(project, "tiny").trials) == 3

    # MLflow: one parent run with the study plots, one nested run per trial, fold runs below.
    ml = mlflow_runs(project)
    runs, client = ml["runs"], ml["client"]
    parents = [r for r in runs if r.info.run_name == "study-tiny"]
    assert len(parents) == 1
    parent = parents[0]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna_trial"]) for r in trials) == [0, 1, 2]
    by_trial = {int(r.data.tags["optuna_trial"]): r for r in trials}
    assert by_trial[2].info.status == "KILLED"
    why = by_trial[2].data.tags["pruned_because"]
    assert "epoch 1:" in why and "the training diverged" in why
    assert by_trial[0].info.status == "FINISHED"
    assert by_trial[0].data.metrics["objective"] == pytest.approx(study.trials[0].value)
    assert float(by_trial[0].data.params[mlflow_key(LR)]) == pytest.approx(
        study.trials[0].params[LR]
    )
    curve = client.get_metric_history(by_trial[0].info.run_id, "fold0_val_loss")
    assert [m.step for m in curve] == [1, 2]
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == by_trial[0].info.run_id]
    assert len(folds) == 1 and folds[0].info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/optimization_history.html"} <= arts
    # the two most important params' contour, the timeline, what the pruner saw
    for name in ("contour", "timeline", "intermediate_values"):
        assert {f"plots/{name}.png", f"plots/{name}.html"} <= arts, name
    for t in study.trials:  # each trial names its MLflow run
        assert by_trial[t.number].info.run_id == t.user_attrs["mlflow_run_id"]
    # optuna-dashboard reads the same storage
    summaries = dashboard_get(project / "optuna/journal.log", "/api/studies")["study_summaries"]
    assert "tiny" in [s["study_name"] for s in summaries]
    assert len(client.get_metric_history(parent.info.run_id, "trial_value")) >= 2
    assert client.get_run(parent.info.run_id).data.metrics["trials_pruned"] == 1
    assert not (project / "optuna/trials/tiny/trial-0").exists()  # trial files cleaned up

    # show --json for scripts
    out = in_process("study", "show", "tiny", "--json", cwd=project).stdout
    shown = json.loads(out)
    assert shown["study"] == "tiny"
    assert [t["state"] for t in shown["trials"]] == ["COMPLETE", "COMPLETE", "PRUNED"]
    best = min(study.trials[:2], key=lambda t: t.value)
    assert shown["best"] == {"number": best.number, "value": best.value, "params": best.params}
    table = in_process("study", "show", "tiny", cwd=project).stdout
    assert f"best: trial {best.number}" in table and "PRUNED" in table

    # apply: exactly the searched keys of params.yaml change, in place
    before_text = (project / "params.yaml").read_text()
    in_process("study", "apply", "tiny", cwd=project)
    after_text = (project / "params.yaml").read_text()
    before, after = yaml.safe_load(before_text), yaml.safe_load(after_text)
    assert after["train"]["parts"][0]["lr"] == best.params[LR]
    assert after["train"]["parts"][0]["loss"]["bce"] == best.params[BCE]
    before["train"]["parts"][0]["lr"] = best.params[LR]
    before["train"]["parts"][0]["loss"]["bce"] = best.params[BCE]
    # and the record of what chose them: the study, its best trial, the images that scored it
    (applied,) = after["provenance"]["studies"]
    assert applied == {
        "name": "tiny",
        "trial": best.number,
        "value": best.value,
        "folds": [0],
        "selection": "inner",
        "inner_fraction": before["train"]["selection"]["inner_fraction"],
        "seed": before["train"]["seed"],
    }
    before["provenance"]["studies"] = [applied]
    assert before == after
    diff = [
        (a, b)
        for a, b in zip(before_text.splitlines(), after_text.splitlines(), strict=True)
        if a != b
    ]
    assert len(diff) == 3


@pytest.mark.slow
def test_apply_exp_runs_a_dvc_experiment(base: Path, tmp_path: Path) -> None:
    """`study apply --exp` runs `dvc exp run -S ...` with the best values."""
    import optuna

    from pneumoseg.studies.storage import open_storage

    project = tmp_path / "exp"
    project.mkdir()
    shutil.copy(base / "params.yaml", project / "params.yaml")
    storage = open_storage(str(project / "optuna/journal.log"))
    study = optuna.create_study(study_name="tiny", storage=storage, direction="minimize")
    study.add_trial(
        optuna.trial.create_trial(
            params={LR: 0.01, BCE: 1.5},
            distributions={
                LR: optuna.distributions.FloatDistribution(1e-4, 0.01, log=True),
                BCE: optuna.distributions.FloatDistribution(0.5, 2),
            },
            value=0.5,
        )
    )
    script = "import yaml; p = yaml.safe_load(open('params.yaml'))['train']['parts'][0]; "
    script += "print(p['lr'], p['loss']['bce'])"
    cmd = f'python -c "{script}" > out.txt'
    stage = {"cmd": cmd, "params": ["train.parts"], "outs": ["out.txt"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"show": stage}}))
    (project / ".gitignore").write_text("/optuna/\n")
    run(["git", "init", "-q"], cwd=project)
    run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=project)
    run(["git", "add", "-A"], cwd=project)
    run(["git", "commit", "-qm", "base"], cwd=project)
    proc = pneumoseg("study", "apply", "tiny", "--exp", cwd=project)
    assert "dvc exp run -S train.parts.0.lr=0.01 -S train.parts.0.loss.bce=1.5" in proc.stdout
    assert (project / "out.txt").read_text().split() == ["0.01", "1.5"]
    shown = run([str(Path(sys.executable).parent / "dvc"), "exp", "show", "--json"], cwd=project)
    (experiment,) = [r for b in json.loads(shown.stdout) for e in b.get("experiments") or []
                     for r in e["revs"]]  # fmt: skip
    values = experiment["data"]["params"]["params.yaml"]["data"]["train"]["parts"][0]
    assert (values["lr"], values["loss"]["bce"]) == (0.01, 1.5)  # the experiment's params
    # the experiment's params record what chose the values (a study from before that record
    # existed counts as scored on its folds' held-out images)
    (applied,) = yaml.safe_load((project / "params.yaml").read_text())["provenance"]["studies"]
    assert applied["name"] == "tiny" and applied["trial"] == 0 and applied["value"] == 0.5
    assert applied["selection"] == "held_out" and applied["folds"] == [0]


def worker(project: Path, *args: str, storage: str | None = None) -> subprocess.Popen:
    """``pneumoseg study run ARGS`` in its own process (``storage``: an RDB URL, given as
    ``PNEUMOSEG_OPTUNA_STORAGE``)."""
    extra = {"PNEUMOSEG_OPTUNA_STORAGE": storage} if storage else {}
    return subprocess.Popen(
        [sys.executable, "-m", "pneumoseg", "-q", "study", "run", *args],
        cwd=project,
        env=one_thread_env() | extra,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_during_first_trial(project: Path, proc: subprocess.Popen, study: str) -> None:
    """kill -9 of worker ``proc`` once its first trial has saved an epoch of training."""
    last = project / f"optuna/trials/{study}/trial-0/work/fold0/last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the trial finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_two_workers_share_one_study(base: Path, tmp_path: Path) -> None:
    project = shutil.copytree(base, tmp_path / "p")
    procs = [worker(project, "tiny", "--trials", "4") for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    ran = [int(re.search(r"this worker ran (\d+) trial", out).group(1)) for out in outputs]
    study = load(project, "tiny")
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))  # unique, nothing lost
    assert sum(ran) == len(numbers)
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert 4 <= len(finished) <= 5  # the target; at most one extra when both start together
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2 and min(ran) >= 1
    # The two workers drew different values (their sampler seeds differ).
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == len(numbers)


@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried(base: Path, tmp_path: Path) -> None:
    project = shutil.copytree(base, tmp_path / "p")
    kill_during_first_trial(project, worker(project, "slow", "--trials", "1"), "slow")
    study = load(project, "slow")
    assert [t.state.name for t in study.trials] == ["RUNNING"]
    killed_params = study.trials[0].params

    in_process("-q", "study", "run", "slow", "--trials", "1", cwd=project)
    study = load(project, "slow")
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["retry_of"] == 0
    assert study.trials[1].params == killed_params  # the same values were trained again
    assert not (project / "optuna/trials/slow/trial-0").exists()
    runs = mlflow_runs(project)["runs"]
    trial0 = [r for r in runs if r.data.tags.get("optuna_trial") == "0"]
    assert [r.info.status for r in trial0] == ["FAILED"]
    # its fold run, left RUNNING by the kill, is closed too
    fold_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial0[0].info.run_id]
    assert fold_runs and all(r.info.status == "FAILED" for r in fold_runs)


@pytest.mark.slow
def test_seeded_study_gives_the_same_trials_again(
    base: Path, studied: Path, tmp_path: Path
) -> None:
    """Same seed, same trials, here through an RDB storage (sqlite, with Optuna's heartbeat)."""
    project = shutil.copytree(base, tmp_path / "again")
    url = f"sqlite:///{project}/optuna/studies.db"
    in_process("-q", "study", "run", "tiny", "--storage", url, cwd=project)
    again = [(t.params, t.value) for t in load(project, "tiny", url).trials]
    first = [(t.params, t.value) for t in load(studied, "tiny").trials][:2]
    assert again == first
    assert len(again) == 2


@pytest.mark.slow
def test_changed_space_needs_a_new_study_name(studied: Path, tmp_path: Path) -> None:
    project = shutil.copytree(studied, tmp_path / "p")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["studies"]["tiny"]["space"][BCE]["high"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = in_process("-q", "study", "run", "tiny", cwd=project, check=False)
    assert proc.returncode == 1
    assert "study tiny: the stored study was run with another space" in proc.stderr
    proc = in_process("study", "show", "nope", cwd=project, check=False)
    assert (
        "studies.nope: no such study (defined: freebies, loss-and-sampling, slow, tiny)"
        in proc.stderr
    )


def test_logged_params_have_mlflow_safe_keys() -> None:
    """Stages log their declared keys, flattened: MLflow-safe, and never the studies section
    (paths with brackets)."""
    from pneumoseg.params import STAGE_PARAMS, flatten, stage_values

    params = load_params(ROOT / "params.yaml")
    for stage in (s for s, keys in STAGE_PARAMS.items() if keys):
        flat = flatten(stage_values(params, stage))
        assert flat and not [k for k in flat if not re.fullmatch(r"[\w./ :-]+", k)]
        assert not [k for k in flat if k.startswith("studies")]


def test_storage_errors_are_one_line_without_the_password() -> None:
    from pneumoseg.studies.storage import open_storage

    with pytest.raises(RuntimeError) as err:
        open_storage("postgresql://user:secret@127.0.0.1:1/optuna")
    message = str(err.value)
    assert message.startswith("Optuna storage postgresql://user:***@127.0.0.1:1/optuna: ")
    assert "secret" not in message and "\n" not in message


def test_trial_params_keep_the_first_parts_and_stay_out_of_the_pipeline(tmp_path: Path) -> None:
    from pneumoseg.studies.config import trial_params

    params = load_params(ROOT / "params.yaml")
    assert len(params.train.parts) >= 2  # the shipped demo uptrains at 256 px
    cfg = params.studies["loss-and-sampling"]
    trial = trial_params(params, cfg, {BCE: 2.5, SHAPE: "step"}, tmp_path / "t3")
    assert len(trial.train.parts) == cfg.parts == 1
    assert trial.train.parts[0].epochs == cfg.budget["train.parts[0].epochs"]
    assert trial.train.parts[0].loss.bce == 2.5
    assert trial.train.parts[0].sample_rate.shape == "step"
    assert trial.train.folds == cfg.folds
    assert trial.train.models_dir == str(tmp_path / "t3" / "models")
    assert params.train.parts[0].loss.bce != 2.5  # the pipeline's params are untouched
    with pytest.raises(ParamsError, match=r"train\.parts\[0\]\.loss\.bce: must be >= 0"):
        trial_params(params, cfg, {BCE: -1.0}, tmp_path / "t4")


def test_a_torn_journal_tail_is_dropped_and_a_corrupt_record_named(tmp_path: Path) -> None:
    import optuna

    from pneumoseg.studies.storage import JournalError, open_storage

    journal = tmp_path / "journal.log"
    study = optuna.create_study(study_name="s", storage=open_storage(str(journal)))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 4, "wor')  # an append cut short by kill -9
    study = optuna.load_study(study_name="s", storage=open_storage(str(journal)))
    assert journal.read_bytes() == whole
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="s", storage=open_storage(str(journal))).trials) == 3

    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:3] + [b"{garbage\n"] + lines[3:]))
    with pytest.raises(JournalError, match=r"journal.log: line 4 is not a JSON record.*head -n 3"):
        open_storage(str(journal))


def _worker_of_a_process(alive: bool) -> tuple[str, subprocess.Popen]:
    """The worker_id of another process on this host, still running or already gone."""
    code = (
        "from pneumoseg.lineage import worker_id; print(worker_id(), flush=True); "
        "import sys, time; time.sleep(60 if sys.argv[1] == 'live' else 0)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "live" if alive else "dead"], env=env(),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if not alive:
        proc.wait(timeout=60)
    return worker, proc


def test_a_trial_killed_before_naming_its_worker_is_failed_at_once(tmp_path: Path) -> None:
    """The kill can land between a trial's creation and its owner attribute: with no other
    registered worker alive, the unowned trial is stale at once (no grace wait); with one alive,
    it may be that worker's trial in the making and is kept for the grace period."""
    import optuna

    from pneumoseg.studies.storage import fail_stale_trials, open_storage, register_worker

    study = optuna.create_study(storage=open_storage(str(tmp_path / "journal.log")))
    dead, _ = _worker_of_a_process(alive=False)
    register_worker(study, dead)
    study.ask()  # RUNNING, no owner yet: the dead worker's trial in the making
    assert [t.number for t in fail_stale_trials(study)] == [0]
    assert study.trials[0].state == optuna.trial.TrialState.FAIL

    live, proc = _worker_of_a_process(alive=True)
    try:
        register_worker(study, live)
        study.ask()
        assert fail_stale_trials(study) == []  # possibly the live worker's
        assert study.trials[1].state == optuna.trial.TrialState.RUNNING
    finally:
        proc.kill()
        proc.wait()
