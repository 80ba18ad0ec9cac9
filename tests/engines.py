"""Real servers on 127.0.0.1 for the tests: PostgreSQL (Debian's package) started with
``initdb`` + ``pg_ctl`` on a temporary data directory.

PostgreSQL refuses to run as root: as root, every command runs as the ``postgres`` user
(``runuser``) and every path it writes is owned by that user. ``.ci/run`` installs the package
where it is missing (``make engines``); elsewhere a missing server skips the tests that need it,
except under ``CI=true``, where it fails them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing(what: str) -> None:
    """Skip (or, under CI, fail) a test whose engine is not installed."""
    unavailable(f"{what} is not installed (make engines)")


def unavailable(message: str) -> None:
    """Skip a test this machine cannot run (no root for a tmpfs, no engine); under CI, where
    everything is set up, fail instead: a skip there would hide a result."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: a skip would hide this test's result)")
    pytest.skip(message)


@dataclass
class Postgres:
    """A running server: the admin connects through the socket, clients over TCP."""

    port: int
    socket_dir: Path
    bin_dir: Path
    as_user: list[str]
    data_dir: Path
    options: str
    logfile: Path

    def restart(self, down_seconds: float = 0.0) -> None:
        """``pg_ctl stop -m fast`` (every client connection is closed), ``down_seconds``
        without a server, then a start on the same port and data."""
        pg_ctl = [*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir)]
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True)
        time.sleep(down_seconds)
        start = [*pg_ctl, "-o", self.options, "-l", str(self.logfile), "-w", "start"]
        subprocess.run(start, check=True, capture_output=True)

    def psql(self, sql: str, db: str = "postgres") -> str:
        cmd = [
            *self.as_user,
            str(self.bin_dir / "psql"),
            *("-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres", "-d", db),
            *("-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql),
        ]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    def dump(self, db: str) -> bytes:
        """``pg_dump`` of database ``db`` (schema and rows, plain SQL)."""
        where = ("-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres")
        cmd = [*self.as_user, str(self.bin_dir / "pg_dump"), *where, db]
        return subprocess.run(cmd, check=True, capture_output=True).stdout

    def create_database(self, name: str, user: str, password: str) -> str:
        """A database owned by a new login role; its ``postgresql://`` URL over TCP."""
        self.psql(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}'")
        self.psql(f'CREATE DATABASE "{name}" OWNER "{user}"')
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{name}"


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """initdb + pg_ctl start on a fresh temporary directory; stopped and removed afterwards."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        missing("PostgreSQL")
    root = Path(tempfile.mkdtemp(prefix="pneumoseg-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses root: run as postgres, on paths it owns
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    data, sock, logfile = root / "data", root / "sock", root / "server.log"
    run = [*as_user]
    subprocess.run(
        [*run, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
         "--auth-host=scram-sha-256", "-E", "UTF8"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run([*run, "mkdir", str(sock)], check=True)
    port = free_port()
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = subprocess.run(
        [*run, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(logfile),
         "-w", "start"],
        capture_output=True, text=True,
    )  # fmt: skip
    if start.returncode:
        log = logfile.read_text() if logfile.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {start.stderr}\n{log[-2000:]}")
    try:
        yield Postgres(port, sock, bin_dir, as_user, data, options, logfile)
    finally:
        subprocess.run(
            [*run, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class S3:
    """An S3-compatible server: clients see only the endpoint URL and the credentials, so the
    same settings work against MinIO or AWS."""

    endpoint: str
    bucket: str
    key_id: str
    secret: str

    def env(self) -> dict[str, str]:
        """The variables boto3, DVC and MLflow read (``MLFLOW_S3_ENDPOINT_URL`` for MLflow)."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2")
        found = pages.paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in found for o in page.get("Contents", [])]


@contextlib.contextmanager
def running_s3(secret: str, bucket: str = "pneumoseg") -> Iterator[S3]:
    """moto's standalone server (the S3 stand-in of DVC's and MLflow's own test suites) on
    127.0.0.1 with one bucket; stopped afterwards."""
    import sys

    exe = Path(sys.executable).parent / "moto_server"
    if not exe.is_file():
        missing("moto[server] (pip install -e '.[dev]')")
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="pneumoseg-s3-"))
    server = S3(f"http://127.0.0.1:{port}", bucket, "pneumoseg-key", secret)
    with (root / "server.log").open("w") as log:
        proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 60
            while not _listening(port):
                assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
            server.client().create_bucket(Bucket=bucket)
            yield server
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            shutil.rmtree(root, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
