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
    message = f"{what} is not installed (make engines)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Postgres:
    """A running server: the admin connects through the socket, clients over TCP."""

    port: int
    socket_dir: Path
    bin_dir: Path
    as_user: list[str]

    def psql(self, sql: str, db: str = "postgres") -> str:
        cmd = [
            *self.as_user,
            str(self.bin_dir / "psql"),
            *("-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres", "-d", db),
            *("-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql),
        ]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

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
        yield Postgres(port, sock, bin_dir, as_user)
    finally:
        subprocess.run(
            [*run, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)
