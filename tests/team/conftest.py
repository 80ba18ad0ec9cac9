"""The team engines (``make test-team``): a real S3-compatible server (moto's) and PostgreSQL on
127.0.0.1, started once for the run; every test here is marked ``team``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from engines import S3, running_s3

SECRET = "s3-canary-Secret-9f31"  # must never appear in a config, log line or MLflow record


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/team/" in item.nodeid:
            item.add_marker(pytest.mark.team)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    with running_s3(SECRET) as server:
        yield server
