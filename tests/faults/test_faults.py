"""Faults injected into the real commands (subprocesses, real files, real stores), each checked
against an uninterrupted run: the same bytes or numbers where the run is deterministic,
otherwise one clear line and a documented exit code, never a half-written output.

Exit codes: 0 done, 1 a one-line error, 2 bad params, 128 + N stopped by signal N
(130 SIGINT, 143 SIGTERM), -9 killed. The long variants (more seeds, 500 fuzzed DICOMs) run
with ``make faults``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from engines import unavailable
from pipeline_helpers import (
    BIN,
    TWO_PART_TRAINING,
    DvcProject,
    Pipeline,
    env,
    in_process,
    pin_threads,
    reset_outputs,
    set_params,
)

pytestmark = [pytest.mark.slow, pytest.mark.faults]

Record = Callable[[str, str, str, bool], None]
HERE = Path(__file__).resolve().parent
SEEDS = int(os.environ.get("PNEUMOSEG_FAULT_SEEDS", "3"))  # make faults: 10
FUZZED = int(os.environ.get("PNEUMOSEG_FAULT_FUZZED", "60"))  # make faults: 500


def pneumoseg(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pneumoseg", *args],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fault_mid_work(
    project: Path,
    args: list[str],
    marker: str,
    delay: float | None,
    signum: int = signal.SIGKILL,
) -> tuple[bool, subprocess.CompletedProcess, float]:
    """Start ``pneumoseg -q ARGS`` with progress lines and send ``signum`` ``delay`` seconds
    after the first stderr line holding ``marker`` (the stage's first progress line: imports
    done, work begun; ``delay`` None: no fault). Returns whether the fault landed mid-work (the
    process was still running when it came), the finished process (with all its stderr) and
    how long it worked from that line to its end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumoseg", "-q", *args],
        cwd=project,
        env=env() | {"PNEUMOSEG_PROGRESS": "lines", "PNEUMOSEG_PROGRESS_SECONDS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    began = threading.Event()

    def read() -> None:  # drain stderr the whole time (a full pipe would stall the stage)
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if marker in line:
                began.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not began.wait(0.01) and proc.poll() is None:
        pass
    began_at, landed = time.monotonic(), False
    if began.is_set() and delay is not None:
        time.sleep(delay)
        landed = proc.poll() is None
        if landed:
            proc.send_signal(signum)
    proc.wait(timeout=600)
    if landed and signum == signal.SIGKILL and proc.returncode != -signal.SIGKILL:
        landed = False  # it ended between the check and the kill (nothing survives a kill)
    if landed and proc.returncode == 0:
        # it had done its work and was exiting (a signal then is reported by the interpreter's
        # shutdown as ignored): not mid-work; a signal that a working stage swallows fails
        # every retry instead
        landed = False
    worked = time.monotonic() - began_at
    reader.join(timeout=60)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", "".join(lines))
    return landed, done, worked


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (relative path -> digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_line(text: str) -> bool:
    lines = [x for x in text.strip().splitlines() if not x.startswith(("WARNING", "INFO"))]
    return len(lines) == 1 and "Traceback" not in text


# ------------------------------------------------------------------------------ convert
@pytest.fixture(scope="module")
def converted(tiny_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny project with a clean conversion (2 workers) to compare against."""
    project = tiny_pipeline.copy(tmp_path_factory.mktemp("faults") / "p")
    set_params(project, {"data": {"workers": 2}})
    shutil.rmtree(project / "data/processed")
    _, proc, worked = fault_mid_work(project, ["convert"], CONVERTING, None)  # no fault: timed
    assert proc.returncode == 0, proc.stderr[-2000:]
    (project / "convert-seconds.txt").write_text(str(worked))
    return project


CONVERTING = "pneumoseg.progress: convert: "  # its first progress line: the work has begun


def convert_mid_work(
    project: Path, seconds: float, fraction: float, signum: int
) -> tuple[bool, subprocess.CompletedProcess]:
    """A fault ``fraction`` of the way into the conversion's work (its clean run took
    ``seconds`` from its first progress line); when the conversion ended first, once more,
    sooner."""
    for f in (fraction, fraction / 4, 0.0):
        landed, proc, _ = fault_mid_work(project, ["convert"], CONVERTING, seconds * f, signum)
        if landed:
            break
    return landed, proc


@pytest.mark.parametrize("seed", range(SEEDS))
def test_kill_9_in_convert_then_rerun_gives_a_clean_conversion(
    converted: Path, tmp_path: Path, seed: int, record: Record
) -> None:
    project = shutil.copytree(converted, tmp_path / "p", symlinks=True)
    clean = tree_digest(project / "data/processed")
    fraction = random.Random(seed).uniform(0.05, 0.9)  # anywhere in the work
    landed, proc = convert_mid_work(project, converted_seconds(converted), fraction, signal.SIGKILL)
    untouched = tree_digest(project / "data/processed") == clean  # old output still whole
    orphans = processes_in(project, "pneumoseg", wait=10)  # its worker processes end with it
    rerun = pneumoseg(project, "-q", "convert")
    held = (
        proc.returncode == -signal.SIGKILL
        and untouched
        and not orphans
        and rerun.returncode == 0
        and tree_digest(project / "data/processed") == clean
    )
    what = "no worker left behind, previous output intact, rerun identical"
    record("kill -9 mid-work", "convert", what, held, landed)
    assert landed and held, (proc.returncode, orphans, rerun.stderr[-2000:])


def processes_in(folder: Path, pattern: str, wait: float = 0.0) -> list[int]:
    """Processes matching ``pattern`` whose working folder is ``folder`` (after waiting up to
    ``wait`` seconds for them to end)."""
    deadline = time.monotonic() + wait
    while True:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
        pids = []
        for pid in map(int, found.split()):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cwd").resolve() == folder.resolve():
                    pids.append(pid)
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_in_convert_stops_cleanly(
    converted: Path, tmp_path: Path, name: str, record: Record
) -> None:
    project = shutil.copytree(converted, tmp_path / "p", symlinks=True)
    clean = tree_digest(project / "data/processed")
    signum = signal.Signals[name]
    landed, proc = convert_mid_work(project, converted_seconds(converted), 0.3, signum)
    stopped = proc.returncode == 128 + signum and "stopped by" in proc.stderr
    rerun = pneumoseg(project, "-q", "convert")
    held = stopped and rerun.returncode == 0 and tree_digest(project / "data/processed") == clean
    record(f"{name} mid-work", "convert", f"exit {128 + signum} with one line, rerun identical",
           held, landed)  # fmt: skip
    assert landed and held, (proc.returncode, proc.stderr[-2000:])


def converted_seconds(project: Path) -> float:
    """How long the clean conversion worked, from its first progress line to its end."""
    return float((project / "convert-seconds.txt").read_text())


@contextlib.contextmanager
def small_disk(path: Path, size: int | str, keep: Path) -> Iterator[Path]:
    """A ``size`` tmpfs mounted at ``path`` for the block (root only, else skip; under CI
    fail); the real
    folder waits at ``keep`` (yielded: the block fills the small disk from it) and is put back
    afterwards."""
    if os.geteuid() != 0:
        unavailable("mounting a small tmpfs needs root")
    shutil.move(str(path), str(keep))
    path.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    ).returncode:
        path.rmdir()
        shutil.move(str(keep), str(path))
        unavailable("cannot mount a tmpfs here")
    try:
        yield keep
    finally:
        subprocess.run(["umount", str(path)], check=True)
        path.rmdir()
        shutil.move(str(keep), str(path))


def stopped_by_full_disk(proc: subprocess.CompletedProcess) -> bool:
    """Exit 1 with the one line of a full disk."""
    return (
        proc.returncode == 1
        and "no space left on the device" in proc.stderr
        and one_line(proc.stderr)
    )


def test_a_full_disk_stops_convert_with_one_line(
    converted: Path, tmp_path: Path, record: Record
) -> None:
    project = shutil.copytree(converted, tmp_path / "p", symlinks=True)
    clean = tree_digest(project / "data/processed")
    disk = project / "data"
    with small_disk(disk, "400k", tmp_path / "data.real") as real:
        (disk / "raw").symlink_to(real / "raw")  # the inputs stay readable
        shutil.copytree(real / "processed", disk / "processed")  # fits in 400k
        full = pneumoseg(project, "-q", "convert")
        kept = tree_digest(disk / "processed") == clean
    rerun = pneumoseg(project, "-q", "convert")  # space again
    held = (
        stopped_by_full_disk(full)
        and kept
        and rerun.returncode == 0
        and tree_digest(disk / "processed") == clean
    )
    record("disk full", "convert", "one line, previous output intact, rerun succeeds", held)
    assert held, full.stderr[-2000:]


def bom_crlf(text: str) -> bytes:
    return ("\ufeff" + text.replace("\n", "\r\n")).encode()


def every_row_twice(text: str) -> bytes:
    head, *rows = text.splitlines()
    return "\n".join([head, *rows, *rows]).encode() + b"\n"


def wrong_header(text: str) -> bytes:
    return text.replace("ImageId", "Image_Id", 1).encode()


def bad_rle(text: str) -> bytes:
    lines = text.splitlines()
    image_id = lines[1].split(",")[0]
    lines[1] = f"{image_id}, 12 x 5"
    return "\n".join(lines).encode() + b"\n"


def latin_1(text: str) -> bytes:
    return text.encode() + "caf\xe9, -1\n".encode("latin-1")


CSV_CASES = {  # name: (damage, expected outcome)
    "BOM and CRLF line ends": (bom_crlf, "identical"),
    "every row twice": (every_row_twice, "identical"),
    "a wrong header": (wrong_header, "line 1"),
    "a bad RLE string": (bad_rle, "failure row"),
    "a non-UTF-8 byte": (latin_1, "not UTF-8"),
}


@pytest.mark.parametrize("case", CSV_CASES)
def test_hostile_rle_csv(converted: Path, tmp_path: Path, case: str, record: Record) -> None:
    project = shutil.copytree(converted, tmp_path / "p", symlinks=True)
    clean = tree_digest(project / "data/processed")
    csv_path = project / "data/raw/demo/train-rle.csv"
    damage, expected = CSV_CASES[case]
    original = csv_path.read_text()
    csv_path.unlink()  # the raw folder may be a symlinked copy: write a new file
    csv_path.write_bytes(damage(original))
    proc = pneumoseg(project, "-q", "convert")
    out = project / "data/processed"
    if expected == "identical":
        held = proc.returncode == 0 and tree_digest(out) == clean
        checked = "converts exactly as the clean csv"
    elif expected == "failure row":
        bad_id = original.splitlines()[1].split(",")[0]
        failures = (out / "failures.csv").read_text()
        manifest = (out / "manifest.csv").read_text()
        held = (
            proc.returncode == 0
            and "train-rle.csv line 2" in failures
            and bad_id in failures
            and f"\n{bad_id}," not in manifest
            and len(manifest.splitlines()) == len(clean_manifest(converted)) - 1
        )
        checked = "that image is a failure row naming the line, the rest converted"
    else:
        held = (
            proc.returncode == 1
            and "train-rle.csv" in proc.stderr
            and expected in proc.stderr
            and one_line(proc.stderr)
            and tree_digest(out) == clean
        )
        checked = "one line naming the file (and line), previous output intact"
    record(case, "convert (RLE csv)", checked, held)
    assert held, proc.stderr[-2000:]


def clean_manifest(project: Path) -> list[str]:
    return (project / "data/processed/manifest.csv").read_text().splitlines()


def fuzz(source: Path, out: Path, n: int, seed: int) -> list[Path]:
    """``n`` damaged copies of the DICOMs below ``source``: byte flips, truncations and header
    changes (seeded)."""
    rng = random.Random(seed)
    files = sorted(source.rglob("*.dcm"))
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for k in range(n):
        raw = bytearray(rng.choice(files).read_bytes())
        kind = k % 3
        if kind == 0:  # byte flips anywhere
            for _ in range(rng.randrange(1, 40)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif kind == 1:  # truncation
            raw = raw[: rng.randrange(1, len(raw))]
        else:  # the header and the start of the pixel data
            for _ in range(rng.randrange(1, 8)):
                raw[rng.randrange(min(len(raw), 4096))] = rng.randrange(256)
        path = out / f"1.2.840.99.{seed}.{k}.dcm"
        path.write_bytes(bytes(raw))
        made.append(path)
    return made


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on each mangled header
def test_fuzzed_dicoms_never_crash_or_hang_convert_or_predict(
    tiny_pipeline: Pipeline, tmp_path: Path, record: Record
) -> None:
    from pneumoseg.dicom import DicomReadError, read_dicom

    raw = tmp_path / "raw"
    files = fuzz(tiny_pipeline.path / "data/raw/demo", raw, FUZZED, seed=11)
    (raw / "train-rle.csv").write_text("ImageId, EncodedPixels\n")
    readable = set()
    for path in files:
        try:
            read_dicom(path)
            readable.add(path.stem)
        except DicomReadError:
            pass
    out = tmp_path / "processed"
    conversion = subprocess.run(
        [sys.executable, "-m", "pneumoseg", "-q", "convert", "--dicom-dir", str(raw),
         "--out", str(out), "--workers", "2"],
        cwd=tiny_pipeline.path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    manifest = (out / "manifest.csv").read_text().splitlines()[1:] if out.exists() else []
    failures = (out / "failures.csv").read_text().splitlines()[1:] if out.exists() else []
    converted_ids = {line.split(",")[0] for line in manifest}
    held = (
        conversion.returncode in (0, 1)  # 1: more failed than data.max_failed_fraction allows
        and "Traceback" not in conversion.stderr
        and converted_ids == readable
        and len(manifest) + len(failures) == len(files)
        and all(line.split(",", 1)[1].strip() for line in failures)  # every one with a reason
    )
    record(f"{FUZZED} fuzzed DICOMs", "convert", "no crash or hang, each bad file named", held)
    assert held, conversion.stderr[-2000:]
    prediction = subprocess.run(
        [sys.executable, "-m", "pneumoseg", "-q", "predict", "--model", "models", "--input",
         str(raw), "--out", str(tmp_path / "pred")],
        cwd=tiny_pipeline.path, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    predicted = (tmp_path / "pred/predictions.csv").read_text().splitlines()[1:]
    skipped = (tmp_path / "pred/failures.csv").read_text().splitlines()[1:]
    held = (
        prediction.returncode == 0
        and {line.split(",")[0] for line in predicted} == readable
        and len(predicted) + len(skipped) == len(files)
        and "Traceback" not in prediction.stderr
    )
    record(f"{FUZZED} fuzzed DICOMs", "predict", "no crash or hang, each bad file named", held)
    assert held, prediction.stderr[-2000:]


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained_once(tiny_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fold 0 trained without interruption (the reference weights; the tests that compare with
    them pin the thread count as this does)."""
    project = tiny_pipeline.copy(tmp_path_factory.mktemp("faults-train") / "p")
    set_params(project, TWO_PART_TRAINING)
    reset_outputs(project, ())
    with pytest.MonkeyPatch.context() as mp:
        pin_threads(mp)
        assert pneumoseg(project, "-q", "train", "--fold", "0").returncode == 0
    return project


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit-for-bit weights: the thread count of the reference (see pin_threads)."""
    pin_threads(monkeypatch)


def weights(project: Path) -> dict[str, torch.Tensor]:
    return torch.load(project / "models/folds/fold0/model.pt", weights_only=True)["state_dict"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def interrupt_training(project: Path, epochs: int, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HERE.parent / "kill_at.py"), str(epochs), name, "-q", "train",
         "--fold", "0"],
        cwd=project, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.parametrize(("name", "epochs"), [("SIGTERM", 1), ("SIGINT", 3)])
def test_a_signal_in_training_stops_it_and_the_rerun_resumes_exactly(
    trained_once: Path, tmp_path: Path, name: str, epochs: int, record: Record, pinned: None
) -> None:
    project = shutil.copytree(trained_once, tmp_path / "p", symlinks=True)
    reset_outputs(project, ("models", "metrics", "plots"))
    stopped = interrupt_training(project, epochs, name)
    code = 128 + signal.Signals[name]
    killed = fold_run_status(project)  # not RUNNING forever: KILLED until a rerun resumes it
    rerun = in_process("-q", "train", "--fold", "0", cwd=project, check=False)
    held = (
        stopped.returncode == code
        and "stopped by" in stopped.stderr
        and killed[1] == "KILLED"
        and rerun.returncode == 0
        and fold_run_status(project) == (killed[0], "FINISHED")  # the same run, resumed
        and same_weights(project, trained_once)
    )
    record(name, "train", f"exit {code} with one line, the run KILLED; the rerun resumes it "
           "and ends with identical weights", held)  # fmt: skip
    assert held, f"{killed} {(stopped.stderr + rerun.stderr)[-2000:]}"


def test_a_resume_state_nothing_will_resume_is_removed(
    trained_once: Path, tmp_path: Path, record: Record
) -> None:
    """A training stopped mid-way whose fold is then put in place another way (DVC restores it
    from its run cache, the same params and data): its resume state would sit in checkpoints/
    for ever; oof removes it with one line. A state of other params is kept."""
    project = shutil.copytree(trained_once, tmp_path / "p", symlinks=True)
    set_params(project, {"pseudo_label": {"folds": []}})  # oof reads fold 0's own model
    model = project / "models/folds/fold0/model.pt"
    before = model.read_bytes()
    stopped = interrupt_training(project, 1, "SIGTERM")
    assert stopped.returncode == 143 and model.read_bytes() == before  # the model in place
    state = project / "checkpoints/fold0"
    assert (state / "last.pt").is_file()
    other = project / "checkpoints/fold1"  # a state of other params: may still be resumed
    shutil.copytree(state, other)
    key = json.loads((other / "run_key.json").read_text())
    (other / "run_key.json").write_text(json.dumps(key | {"run_key": "other|params|fold1"}))
    proc = pneumoseg(project, "-q", "oof")
    lines = [x for x in proc.stderr.splitlines() if "removed" in x]
    held = (
        proc.returncode == 0
        and not state.exists()
        and len(lines) == 1
        and f"removed {Path('checkpoints/fold0')}" in lines[0]
        and other.is_dir()
    )
    record("training stopped, its fold restored another way", "oof",
           "the stale resume state removed with one line", held)  # fmt: skip
    assert held, proc.stderr[-2000:]


def fold_run_status(project: Path) -> tuple[str, str]:
    """(run id, status) of fold 0's one training run in the project's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("pneumoseg-stages")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'train'")
    return run.info.run_id, run.info.status


def test_a_torn_resume_state_falls_back_one_generation(
    trained_once: Path, tmp_path: Path, record: Record, pinned: None
) -> None:
    project = shutil.copytree(trained_once, tmp_path / "p", symlinks=True)
    reset_outputs(project, ("models", "metrics", "plots"))
    assert interrupt_training(project, 3, "SIGKILL").returncode == -signal.SIGKILL
    last = project / "checkpoints/fold0/last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn
    rerun = pneumoseg(project, "-q", "train", "--fold", "0")
    held = (
        rerun.returncode == 0
        and "unreadable" in rerun.stderr
        and same_weights(project, trained_once)
    )
    record("truncated last.pt", "train", "resumes from previous.pt, identical weights", held)
    assert held, rerun.stderr[-2000:]

    # both generations torn, a torn top-k checkpoint: one line naming the file, exit 1
    assert interrupt_training(project, 3, "SIGKILL").returncode == -signal.SIGKILL
    for name in ("last.pt", "previous.pt"):
        path = project / "checkpoints/fold0" / name
        path.write_bytes(path.read_bytes()[:100])
    both = pneumoseg(project, "-q", "train", "--fold", "0")
    held = both.returncode == 1 and "last.pt" in both.stderr and one_line(both.stderr)
    record("truncated last.pt and previous.pt", "train", "one line naming them, exit 1", held)
    assert held, both.stderr[-2000:]
    shutil.rmtree(project / "checkpoints")
    # killed after the last epoch, the rerun goes straight to the final weights, which read the
    # last part's top-k checkpoints
    epochs = len((trained_once / "plots/fold0/history.csv").read_text().splitlines()) - 1
    assert interrupt_training(project, epochs, "SIGKILL").returncode == -signal.SIGKILL
    last_part = sorted((project / "checkpoints/fold0").glob("part*-epoch*.pt"))[-1].name[:5]
    kept = sorted((project / "checkpoints/fold0").glob(f"{last_part}-*.pt"))
    for path in kept:
        path.write_bytes(path.read_bytes()[:100])
    torn = pneumoseg(project, "-q", "train", "--fold", "0")
    held = (
        torn.returncode == 1 and any(p.name in torn.stderr for p in kept) and one_line(torn.stderr)
    )
    record("truncated top-k checkpoint", "train", "one line naming it, exit 1", held)
    assert held, torn.stderr[-2000:]


# ------------------------------------------------------------------ torn pipeline files
TORN = [  # (file to damage, how, the command that reads it, what the line must name)
    ("data/processed/images/{first}.png", "half", "arrays", "dvc checkout"),
    ("data/arrays/64/images.npy", "half_array", "train --fold 0", "dvc repro arrays"),
    ("models/postprocess.json", "garbage", "submit", "dvc checkout"),
    ("data/processed/manifest.csv", "drop_column", "thresholds", "dvc checkout"),
    ("optuna/journal.log", "garbage_line", "thresholds", "head -n"),
]
DAMAGE = {
    "half": "a half-written PNG in data/processed",
    "half_array": "a half-written array in data/arrays",
    "garbage": "a corrupt postprocess.json",
    "drop_column": "manifest.csv without a column",
    "garbage_line": "a corrupt record in optuna/journal.log",
}


@pytest.mark.parametrize(("target", "how", "command", "hint"), TORN)
def test_a_torn_file_is_one_line_naming_it(
    tiny_pipeline: Pipeline,
    tmp_path: Path,
    target: str,
    how: str,
    command: str,
    hint: str,
    record: Record,
) -> None:
    project = tiny_pipeline.copy(tmp_path / "p")
    first = (project / "data/arrays/ids.txt").read_text().split()[0]  # a training image
    path = project / target.format(first=first)
    data = path.read_bytes()
    if how in ("half", "half_array"):
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"{not json")
    elif how == "drop_column":
        lines = path.read_text().splitlines()
        path.write_text("\n".join(",".join(x.split(",")[:1]) for x in lines) + "\n")
    else:
        path.write_bytes(data + b"{garbage\n")
    if command == "thresholds":  # a new study, so the journal is read and appended
        set_params(project, {"thresholds": {"seed": 99}})
    proc = pneumoseg(project, "-q", *command.split())
    name = Path(target).name.replace("{first}", first)
    held = (
        proc.returncode == 1
        and name in proc.stderr
        and hint in proc.stderr
        and one_line(proc.stderr)
    )
    record(DAMAGE[how], command.split()[0], "one line naming the file and the way out", held)
    assert held, proc.stderr[-2000:]


# ------------------------------------------------------------------------- concurrency
def test_two_dvc_repro_at_once_the_second_is_refused(
    dvc_project: DvcProject, tmp_path: Path, record: Record
) -> None:
    project = dvc_project.copy(tmp_path / "p")
    set_params(project, {"thresholds": {"seed": 5}})  # something to run
    first = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "thresholds"], cwd=project, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    for line in first.stdout:  # type: ignore[union-attr]
        if "Running stage" in line:  # the first holds the repo's lock and is working
            break
    running = first.poll() is None
    second = subprocess.run(
        [str(BIN / "dvc"), "repro", "thresholds"], cwd=project, env=env(),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    first.communicate(timeout=300)
    held = (
        running
        and first.returncode == 0
        and second.returncode != 0
        and "lock" in second.stderr.lower()
    )
    record("two `dvc repro` at once", "dvc", "the second is refused by DVC's lock", held)
    assert held, second.stderr[-2000:]


def dvc_out(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dvc"), *args], cwd=project, env=env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def stage_processes(project: Path, pattern: str) -> list[int]:
    """Processes matching ``pattern`` that run in one of the project's experiment copies."""
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    pids = []
    for pid in map(int, found.split()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cwd").resolve().is_relative_to(project.resolve() / ".dvc"):
                pids.append(pid)
    return pids


def queue_status(project: Path) -> dict[str, str]:
    """Experiment name -> status of ``dvc queue status``."""
    lines = dvc_out(project, "queue", "status").stdout.splitlines()
    return {p[1]: p[-1] for p in (x.split() for x in lines[1:]) if len(p) >= 4}


def wait_queue(project: Path, name: str, seconds: float = 600) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = queue_status(project).get(name, "")
        if status in ("Success", "Failed"):
            return status
        time.sleep(2)
    return "timed out"


@pytest.mark.skipif(SEEDS <= 3, reason="a long variant: `make faults` runs it")
def test_a_killed_dvc_queue_worker_leaves_the_queue_usable(
    dvc_project: DvcProject, tmp_path: Path, record: Record
) -> None:
    """kill -9 of the queue worker and its experiment mid-training (a machine that lost the
    worker): `dvc queue status` still answers, a new `dvc queue start` runs what is queued, and
    `dvc queue kill` + `dvc queue remove` clear the experiment DVC still shows as Running."""
    project = dvc_project.copy(tmp_path / "p")
    assert (
        dvc_out(project, "exp", "run", "--queue", "-S", "train.seed=9", "-n", "killed").returncode
        == 0
    )
    assert (
        dvc_out(
            project, "exp", "run", "--queue", "-S", "thresholds.seed=9", "-n", "next"
        ).returncode
        == 0
    )
    worker = subprocess.Popen(
        [str(BIN / "dvc"), "queue", "start", "-j", "1"], cwd=project, env=env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    worker.wait()  # the worker runs detached, in a session of its own
    deadline, training = time.monotonic() + 300, None
    while training is None and time.monotonic() < deadline:  # the first experiment trains
        training = next(iter(stage_processes(project, "train --fold")), None)
        time.sleep(0.2)
    time.sleep(1.0)
    assert training is not None, "the queued experiment never started training"
    os.killpg(os.getpgid(training), signal.SIGKILL)  # the worker, its experiment, the stage
    shown = queue_status(project)
    restarted = dvc_out(project, "queue", "start", "-j", "1")  # its worker detaches
    next_done = wait_queue(project, "next")
    killed = dvc_out(project, "queue", "kill", "killed")
    after_kill = queue_status(project).get("killed")
    removed = dvc_out(project, "queue", "remove", "killed")
    held = (
        shown.get("killed") == "Running"  # DVC cannot tell its worker died
        and shown.get("next") == "Queued"
        and restarted.returncode == 0
        and next_done == "Success"
        and killed.returncode == 0
        and after_kill == "Failed"
        and removed.returncode == 0
        and "killed" not in queue_status(project)
    )
    checked = "status answers, `queue start` runs the rest, `queue kill` + `remove` clear it"
    record("kill -9 of a `dvc queue` worker mid-experiment", "dvc queue", checked, held)
    assert held, (shown, next_done, after_kill, killed.stderr[-500:])
