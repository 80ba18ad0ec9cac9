"""The team engines' costs (issue "team scale-out"), each against a bare baseline in the same run:

1. Tracking per epoch: pneumoseg's ``Tracker.log_metrics`` of one epoch row (the 12 metrics a
   training epoch logs) into the local sqlite store and into an MLflow server on PostgreSQL with
   S3 artifacts (moto's server), against a bare ``MlflowClient.log_batch`` of the same row to the
   same store, the two interleaved epoch by epoch (alternating which goes first). Reported in
   ms per epoch and as the server / sqlite and tracker / bare ratios.
2. ``dvc push`` to the S3 remote, then a fresh ``git clone`` + ``dvc pull``, of the tiny demo
   pipeline's outputs (the sizes are printed), against ``aws s3 cp``-like boto3 uploads of the
   same files (the bare baseline).

Engines are the test fixtures' (tests/engines.py): PostgreSQL from Debian's package, moto's
S3 server, all on 127.0.0.1. Run on an idle machine:

    .venv/bin/python bench/team.py [--epochs 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from engines import free_port, running_postgres, running_s3  # noqa: E402
from pipeline_helpers import BIN, env, http_server, reproduced_project  # noqa: E402

ROW = {  # one epoch's metrics, as training logs them
    k: 0.5
    for k in (
        "train_loss", "val_loss", "val_kaggle_dice", "val_dice_pos", "val_empty_acc",
        "val_kaggle_dice_area", "lr", "sample_rate", "epoch_seconds", "part", "size", "best",
    )
}  # fmt: skip


def paired_ms(uri: str, epochs: int) -> dict[str, list[float]]:
    """ms per epoch row logged to ``uri`` by the Tracker and by a bare client, interleaved:
    each epoch logs through both, in alternating order, so a server that warms up or drifts
    weighs on both sides alike (a sequential run of one side after the other measured the
    first side on a cold server)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pneumoseg.params import MlflowParams
    from pneumoseg.tracking import Tracker

    os.environ["MLFLOW_TRACKING_URI"] = uri
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("bench") or client.get_experiment(
        client.create_experiment("bench")
    )
    run_id = client.create_run(exp.experiment_id).info.run_id
    tracker = Tracker(MlflowParams(experiment="bench"), experiment="bench")
    tracker.start("bench", {"stage": "bench"})

    def bare(step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, [Metric(k, v, now, step) for k, v in ROW.items()])

    def ours(step: int) -> None:
        tracker.log_metrics(ROW, step)

    times: dict[str, list[float]] = {"tracker": [], "bare client": []}
    for step in range(1, epochs + 1):
        order = [("tracker", ours), ("bare client", bare)]
        for name, log in order if step % 2 else order[::-1]:
            t0 = time.perf_counter()
            log(step)
            times[name].append((time.perf_counter() - t0) * 1000)
    client.set_terminated(run_id)
    tracker.end()
    return times


def timed(cmd: list[str], cwd: Path, extra: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env() | (extra or {}), check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument(
        "--project", type=Path, help="a git + DVC project after `dvc repro` (default: a new one)"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pneumoseg-bench-team-"))
    with running_postgres() as pg, running_s3("bench-secret") as s3:
        for k, v in s3.env().items():
            os.environ[k] = v
        backend = pg.create_database("mlflow", "mlflow", "bench-pw").replace(
            "postgresql://", "postgresql+psycopg://", 1
        )
        port = free_port()
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", backend,
               "--artifacts-destination", f"s3://{s3.bucket}/mlflow"]  # fmt: skip
        with http_server(cmd, port, tmp / "server.log", extra_env=s3.env()) as (server, _):
            sqlite = f"sqlite:///{tmp}/mlflow.db"
            local, remote = paired_ms(sqlite, args.epochs), paired_ms(server, args.epochs)
            figures = {
                "tracker -> sqlite": local["tracker"],
                "bare client -> sqlite": local["bare client"],
                "tracker -> server": remote["tracker"],
                "bare client -> server": remote["bare client"],
            }
        print(f"\nTracking one epoch row ({len(ROW)} metrics), {args.epochs} epochs each")
        print(f"{'':24} {'median ms':>10} {'p90 ms':>8}")
        for name, t in figures.items():
            p90 = sorted(t)[int(0.9 * len(t)) - 1]
            print(f"{name:24} {statistics.median(t):10.1f} {p90:8.1f}")
        ratio = statistics.median(figures["tracker -> server"]) / statistics.median(
            figures["tracker -> sqlite"]
        )
        over_bare = statistics.median(figures["tracker -> server"]) / statistics.median(
            figures["bare client -> server"]
        )
        print(
            f"server / sqlite: {ratio:.2f}x; tracker / bare client on the server: {over_bare:.2f}x"
        )

        project = args.project or reproduced_project(tmp / "p").path
        dvc = str(BIN / "dvc")
        remote = ["remote", "modify", "--local", "store"]
        credentials = ([*remote, "access_key_id", s3.key_id],
                       [*remote, "secret_access_key", s3.secret])  # fmt: skip
        where = (["remote", "add", "-d", "store", f"s3://{s3.bucket}/dvc"],
                 ["remote", "modify", "store", "endpointurl", s3.endpoint])  # fmt: skip
        for c in (*where, *credentials):
            subprocess.run([dvc, *c], cwd=project, env=env(), check=True, capture_output=True)
        subprocess.run(["git", "commit", "-qam", "remote"], cwd=project, env=env(), check=True)
        cache = project / ".dvc/cache"
        files = [p for p in cache.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        push = timed([dvc, "push"], project)
        t0 = time.perf_counter()
        client = s3.client()
        for p in files:
            client.upload_file(str(p), s3.bucket, f"bare/{p.relative_to(cache)}")
        bare = time.perf_counter() - t0
        clone = tmp / "clone"
        subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
        for c in credentials:
            subprocess.run([dvc, *c], cwd=clone, env=env(), check=True, capture_output=True)
        pull = timed([dvc, "pull"], clone)
        print(
            f"\ndvc remote on S3: {len(files)} cache files, {size / 1e6:.1f} MB (tiny demo outputs)"
        )
        print(f"dvc push {push:.1f} s, fresh clone dvc pull {pull:.1f} s; bare boto3 upload of the "
              f"same files {bare:.1f} s (push / bare {push / bare:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
