"""Screenshots of the MLflow UI for the README, taken with Debian's headless chromium driven by
Playwright (not part of ``make test``):

- ``mlflow-results.png``: the results experiment's saved view (one row per pipeline result);
- ``mlflow-compare.png``: Compare on the newest three rows (parallel coordinates, params);
- ``mlflow-charts.png``: the runs' chart view (the linked fold runs' curves, one line per row);
- ``mlflow-per-image.png``: a row's per-image table, sorted by ``dice_cross_fitted``;
- ``optuna-contour.png``: the contour plot of that row's threshold study;
- ``mlflow-training-run.png``, ``mlflow-system-metrics.png``, ``mlflow-registered-model.png``.

    apt-get install chromium && .venv/bin/pip install playwright
    .venv/bin/python docs/take_screenshots.py PROJECT   # after `dvc repro` + experiments

PROJECT's ``mlruns/mlflow.db`` is served by ``mlflow ui`` on a free port of 127.0.0.1. PNGs go
to ``docs/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from engines import free_port  # noqa: E402
from pipeline_helpers import BIN, http_server  # noqa: E402

VIEW = "workflowType=machine_learning"  # MLflow 3's "Model training" view
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


class Browser:
    """One headless chromium page; :meth:`shoot` opens a URL and saves a PNG."""

    def __init__(self, playwright: Any, out: Path) -> None:
        self.browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        self.out = out

    def shoot(self, url: str, name: str, size: tuple[int, int] = (1600, 900), act: Any = None):
        page = self.browser.new_page(viewport={"width": size[0], "height": size[1]})
        page.goto(url)
        page.wait_for_timeout(6000)
        close = page.get_by_role("button", name="Close")  # the assistant panel, when open
        if close.count():
            close.last.click()
        if act is not None:
            act(page)
            page.wait_for_timeout(2500)
        page.screenshot(path=str(self.out / name))
        page.close()
        print(f"{self.out / name} <- {url}")


def main() -> None:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    store = f"sqlite:///{args.project.resolve()}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=store)
    results = client.get_experiment_by_name("pneumoseg").experiment_id
    stages = client.get_experiment_by_name("pneumoseg-stages").experiment_id
    rows = client.search_runs([results], order_by=["attributes.start_time DESC"], max_results=3)
    newest = rows[0]
    (training,) = client.search_runs(
        [stages],
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
        sync_playwright() as playwright,
    ):
        b = Browser(playwright, args.out)
        runs_page = f"{url}/#/experiments/{results}/runs?viewStateShareKey=pneumoseg-results&{VIEW}"
        b.shoot(runs_page, "mlflow-results.png", (1900, 520))
        b.shoot(
            runs_page,
            "mlflow-charts.png",
            (1700, 1100),
            lambda page: page.locator("label:has(input[value=CHART])").click(),
        )
        ids = json.dumps([r.info.run_id for r in rows])
        compare = f"{url}/#/compare-runs?runs={ids}&experiments={json.dumps([results])}&{VIEW}"
        b.shoot(compare, "mlflow-compare.png", (1700, 1000))
        row = f"{url}/#/experiments/{results}/runs/{newest.info.run_id}"
        b.shoot(
            f"{row}/artifacts/per_image.json?{VIEW}",
            "mlflow-per-image.png",
            (1800, 800),
            lambda page: page.get_by_text("dice_cross_fitted", exact=True).first.click(),
        )
        thresholds = newest.data.tags["run.thresholds"]
        study = f"{url}/#/experiments/{stages}/runs/{thresholds}"
        b.shoot(f"{study}/artifacts/study_plots/contour.html?{VIEW}", "optuna-contour.png")
        page = f"{url}/#/experiments/{stages}/runs/{training.info.run_id}"
        b.shoot(f"{page}?{VIEW}", "mlflow-training-run.png", (1500, 1000))
        b.shoot(f"{page}/system-metrics?{VIEW}", "mlflow-system-metrics.png", (1500, 1000))
        b.shoot(f"{url}/#/models/pneumoseg?{VIEW}", "mlflow-registered-model.png", (1500, 1000))


if __name__ == "__main__":
    main()
