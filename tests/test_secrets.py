"""No password from a URL reaches an output file, a log line, an error message or MLflow.

A real PostgreSQL server holds the threshold study; its URL carries a canary password, given
through params.yaml, the ``--storage`` flag and ``PNEUMOSEG_OPTUNA_STORAGE``. Afterwards no
byte of any file the pipeline wrote (outputs, metrics, plots, the MLflow database and
artifacts, the registered model) and no line the commands printed contains the canary.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
from engines import Postgres
from pipeline_helpers import Pipeline, env, set_params

pytestmark = pytest.mark.slow

CANARY = "CANARY-pw-7f3a9c"
# a password with the characters that cut URL redaction short: written into the URL with "@"
# and "%" percent-encoded, as libpq and SQLAlchemy want it
ODD = "C@n:ary/7%z-odd"
ODD_IN_URL = quote(ODD, safe=":/")


def pneumoseg(project: Path, *args: str, extra_env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "pneumoseg", *args],
        cwd=project,
        env=env() | (extra_env or {}),
        capture_output=True,
        text=True,
    )


def test_a_storage_password_reaches_no_output_log_or_mlflow(
    tiny_pipeline: Pipeline, postgres: Postgres, tmp_path: Path
) -> None:
    url = postgres.create_database("optuna_canary", "canary_user", CANARY)
    odd_url = postgres.create_database("optuna_odd", "odd_user", ODD.replace("'", "''"))
    odd_url = odd_url.replace(ODD, ODD_IN_URL)
    project = tiny_pipeline.copy(tmp_path / "p")
    printed: list[str] = []

    def check(proc: subprocess.CompletedProcess, ok: bool = True) -> None:
        printed.extend([proc.stdout, proc.stderr])
        assert (proc.returncode == 0) == ok, proc.stderr[-2000:]

    set_params(project, {"thresholds": {"storage": url, "trials": 3}})  # from params.yaml
    check(pneumoseg(project, "thresholds"))
    check(pneumoseg(project, "thresholds", "--trials", "5", "--storage", url))  # a flag
    # from the environment: a password with "@", "/", ":" and "%" in it, and --debug (every
    # traceback printed, redacted)
    set_params(project, {"thresholds": {"storage": None, "trials": 3}})
    odd = {"PNEUMOSEG_OPTUNA_STORAGE": odd_url, "PNEUMOSEG_DEBUG": "1"}
    for stage in ("thresholds", "evaluate", "register", "result"):
        check(pneumoseg(project, stage, extra_env=odd))
    # error paths: a server that does not answer, a study that does not exist
    dead = url.replace(f":{postgres.port}/", ":1/")
    proc = pneumoseg(project, "thresholds", "--storage", dead)
    check(proc, ok=False)
    assert "canary_user:***@127.0.0.1:1/optuna_canary" in proc.stderr
    check(pneumoseg(project, "study", "show", "loss-and-sampling", "--storage", url), ok=False)

    secrets = (CANARY, ODD, ODD_IN_URL)
    leaks = [p for p in printed if any(secret in p for secret in secrets)]
    assert not leaks, leaks[0][-500:]
    import json

    post = json.loads((project / "models/postprocess.json").read_text())
    assert post["storage"].startswith("postgresql://odd_user:***@")  # the last study's
    written = [
        p
        for p in project.rglob("*")
        if p.is_file() and p.name != "params.yaml" and "src" not in p.relative_to(project).parts
    ]
    assert any(p.name == "mlflow.db" for p in written)
    for secret in secrets:
        assert not [str(p) for p in written if secret.encode() in p.read_bytes()], secret


@contextmanager
def failing_tracking_server() -> Iterator[int]:
    """A server on 127.0.0.1 that answers every request with 500 and the request's URL (the
    way a proxy in front of a tracking server may); yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            body = f"internal error at http://{self.headers.get('Host')}{self.path}".encode()
            self.send_response(500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_tracking_server_answering_500_leaks_no_password(
    tiny_pipeline: Pipeline, tmp_path: Path
) -> None:
    """The tracking URL's password (and MLflow's own credentials variables) never reach the
    output when every call fails: the stages that carry on warn in one line, the ones that
    need the store stop with one line."""
    project = tiny_pipeline.copy(tmp_path / "p")
    with failing_tracking_server() as port:
        uri = f"http://tracker:{ODD_IN_URL}@127.0.0.1:{port}"
        extra = {
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_TRACKING_PASSWORD": CANARY,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        }
        runs = {stage: pneumoseg(project, stage, extra_env=extra)
                for stage in ("evaluate", "register")}  # fmt: skip
    for stage, proc in runs.items():
        out = proc.stdout + proc.stderr
        for secret in (CANARY, ODD, ODD_IN_URL):
            assert secret not in out, (stage, out[-800:])
        assert "Traceback" not in out, (stage, out[-800:])
    assert runs["evaluate"].returncode == 0  # carries on; the local files keep the record
    assert runs["register"].returncode == 1  # needs the registry
    assert "tracker:***@127.0.0.1" in runs["register"].stderr
