"""What a `dvc repro` with nothing to do costs on a real project, against the floor of its DAG.

    python bench/noop.py PROJECT [--repeats 5]

PROJECT: a pneumoseg project after a full ``dvc repro`` (e.g. a clone of this repo after
``make demo``). Three timings, each the median of ``--repeats`` runs after one warm-up, in
rotated order:
- ``project``: ``dvc repro`` in PROJECT (nothing changed, so nothing runs);
- ``floor``: the same ``dvc.yaml``, ``params.yaml``, code and ``dvc.lock`` shape (every stage,
  dep, out, param, metric and plot) in a temp repo where each output is one tiny file (a
  directory output holds one file, plus the files other stages name inside it), recorded with
  ``dvc commit``: what DVC costs for this DAG whatever the data;
- ``one stage``: a repo with one stage, one dep and one out: DVC's fixed cost.
``project / floor`` is the project's own cost (target <= 1.5x); ``dvc status`` is timed too.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "DVC_NO_ANALYTICS": "1",
    **{f"GIT_{who}_NAME": "bench" for who in ("AUTHOR", "COMMITTER")},
    **{f"GIT_{who}_EMAIL": "bench@example.invalid" for who in ("AUTHOR", "COMMITTER")},
}


def sh(cwd: Path, *args: str) -> str:
    proc = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} in {cwd}: {proc.stderr[-2000:]}")
    return proc.stdout


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, str(BIN / "dvc"), *args)


def init_repo(path: Path) -> None:
    sh(path, "git", "init", "-q")
    dvc(path, "init", "-q")
    dvc(path, "config", "core.analytics", "false")


def floor_repo(project: Path, dest: Path) -> Path:
    """The project's DAG with one-file outputs (see the module docstring)."""
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(project / name, dest / name)
    shutil.copytree(project / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__"))
    if (project / ".dvc/plots").is_dir():
        shutil.copytree(project / ".dvc/plots", dest / ".dvc-plots")
    init_repo(dest)
    if (dest / ".dvc-plots").is_dir():
        shutil.copytree(dest / ".dvc-plots", dest / ".dvc/plots")
        shutil.rmtree(dest / ".dvc-plots")
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    dirs = {o["path"] for st in lock.values() for o in st.get("outs", []) if ".dir" in o["md5"]}
    files = {
        o["path"] for st in lock.values() for o in st.get("outs", []) if ".dir" not in o["md5"]
    }
    for st in lock.values():  # deps that are files inside another stage's directory output
        for d in st.get("deps", []):
            inside = any(d["path"].startswith(x + "/") for x in dirs)
            if inside and ".dir" not in d.get("md5", ""):
                files.add(d["path"])
    for path in dirs:
        (dest / path).mkdir(parents=True, exist_ok=True)
        (dest / path / "one.txt").write_text("x\n")
    for path in files:
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_text("{}\n" if path.endswith(".json") else "x\n")
    dvc(dest, "commit", "-f", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "floor")
    return dest


def one_stage_repo(dest: Path) -> Path:
    dest.mkdir(parents=True)
    init_repo(dest)
    (dest / "in.txt").write_text("x\n")
    dvc(
        dest,
        "stage",
        "add",
        "-q",
        "-n",
        "one",
        "-d",
        "in.txt",
        "-o",
        "out.txt",
        "cp in.txt out.txt",
    )
    dvc(dest, "repro", "-q")
    return dest


def timed(cwd: Path, *args: str) -> float:
    start = time.perf_counter()
    out = dvc(cwd, *args)
    seconds = time.perf_counter() - start
    if args[0] == "repro" and "Running stage" in out:
        raise RuntimeError(f"{cwd}: `dvc repro` ran a stage; the bench needs an up-to-date repo")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    project = args.project.resolve()
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    outs = sum(len(st.get("outs", [])) for st in lock.values())
    deps = sum(len(st.get("deps", [])) for st in lock.values())
    files = sum(1 for _ in project.rglob("*") if _.is_file() and ".git" not in _.parts)
    print(f"project {project}: {len(lock)} stages, {deps} deps, {outs} outs, {files} files")
    with tempfile.TemporaryDirectory(prefix="pneumoseg-noop-") as tmp:
        repos = {
            "project": project,
            "floor": floor_repo(project, Path(tmp) / "floor"),
            "one stage": one_stage_repo(Path(tmp) / "one"),
        }
        results: dict[tuple[str, str], list[float]] = {}
        for command in (("repro",), ("status",)):
            for repo in repos.values():
                timed(repo, *command)  # warm-up: DVC's state db, the page cache
            order = list(repos)
            for r in range(args.repeats):
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    key = (name, command[0])
                    results.setdefault(key, []).append(timed(repos[name], *command))
        print(f"median of {args.repeats} runs (s)      dvc repro   dvc status")
        for name in repos:
            repro, status = (statistics.median(results[(name, c)]) for c in ("repro", "status"))
            print(f"  {name:<30} {repro:9.2f}   {status:9.2f}")
        ratio = statistics.median(results[("project", "repro")]) / statistics.median(
            results[("floor", "repro")]
        )
        print(f"project / floor (dvc repro) = {ratio:.2f}x (target <= 1.5)")


if __name__ == "__main__":
    main()
