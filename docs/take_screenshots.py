"""Screenshots of the MLflow UI for the README, taken with Debian's headless chromium (not part of
``make test``): the experiment's runs, a training run (overview with its datasets and source),
its system metrics and the registered model page.

    apt-get install chromium
    .venv/bin/python docs/take_screenshots.py PROJECT   # a project after `dvc repro`

PROJECT's ``mlruns/mlflow.db`` is served by ``mlflow ui`` on a free port of 127.0.0.1; the
newest finished training run is shown. PNGs go to ``docs/``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from engines import free_port  # noqa: E402
from pipeline_helpers import BIN, http_server  # noqa: E402


def shoot(url: str, out: Path, size: str = "1500,1000") -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="pneumoseg-chromium-") as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={size}",
             "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw",
             f"--screenshot={out}", url],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
    print(f"{out} <- {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{args.project.resolve()}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("pneumoseg")
    (run,) = client.search_runs(
        [experiment.experiment_id],
        "tags.stage = 'train' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    port = free_port()
    cmd = [str(BIN / "mlflow"), "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as tmp,
        http_server(cmd, port, Path(tmp) / "ui.log", cwd=args.project) as (url, _),
    ):
        # the UI's "GenAI / Model training" switch is a browser setting: open the latter
        view = "?workflowType=machine_learning"
        experiment_page = f"{url}/#/experiments/{experiment.experiment_id}"
        shoot(experiment_page + view, args.out / "mlflow-experiment.png")
        page = f"{experiment_page}/runs/{run.info.run_id}"
        shoot(page + view, args.out / "mlflow-training-run.png")
        shoot(f"{page}/system-metrics{view}", args.out / "mlflow-system-metrics.png")
        shoot(f"{url}/#/models/pneumoseg{view}", args.out / "mlflow-registered-model.png")


if __name__ == "__main__":
    main()
