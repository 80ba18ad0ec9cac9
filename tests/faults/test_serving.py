"""The served model under load and abuse (127.0.0.1 only, bounded loops): ``pneumoseg serve``
(MLflow's scoring server with the body limit) on the tiny pipeline's registered version.

Load: 200 requests from 8 concurrent clients, each answer equal to the same request sent
alone. Abuse: a 100 MB body, 10,000 rows, a non-DICOM payload and a decompression bomb (a tiny
DICOM declaring 50,000 x 50,000 pixels), each answered with a 4xx naming the row or the
limit, with the server's peak RSS measured before and after and a normal request served after.
"""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from engines import free_port
from pipeline_helpers import Pipeline, http_server

pytestmark = [pytest.mark.slow, pytest.mark.faults]

Record = Callable[[str, str, str, bool], None]


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, Any]:
    """(status, parsed JSON answer) of a POST; 4xx/5xx answers are returned, not raised."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def records(*rows: dict[str, Any]) -> bytes:
    return json.dumps({"dataframe_records": list(rows)}).encode()


@pytest.fixture(scope="module")
def served(tiny_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``pneumoseg serve --model models:/pneumoseg/1`` on a free port; (url, pid, project)."""
    project = tiny_pipeline.copy(tmp_path_factory.mktemp("serve") / "p")
    port = free_port()
    cmd = [sys.executable, "-m", "pneumoseg", "serve", "--model", "models:/pneumoseg/1",
           "--port", str(port)]  # fmt: skip
    with http_server(cmd, port, project / "serve.log", cwd=project) as (url, pid):
        yield url, pid, project


def dicom_rows(project: Path) -> list[dict[str, str]]:
    files = sorted((project / "data/raw/demo").rglob("*.dcm"))[:8]
    return [{"image_id": f.stem, "dicom_b64": base64.b64encode(f.read_bytes()).decode()}
            for f in files]  # fmt: skip


def bomb(project: Path) -> bytes:
    """A demo DICOM, RLE-compressed (18 kB), whose header declares a 50,000 x 50,000 image:
    decoding it would allocate 2.5 GB before finding that the data is short."""
    import pydicom
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(next((project / "data/raw/demo").rglob("*.dcm")))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.compress(RLELossless)
    ds.Rows = ds.Columns = 50_000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_200_requests_from_8_clients_answer_like_one(served: Any, record: Record) -> None:
    url, pid, project = served
    rows = dicom_rows(project)
    alone = {r["image_id"]: post(f"{url}/invocations", records(r)) for r in rows}
    assert all(status == 200 for status, _ in alone.values()), alone

    def one(i: int) -> tuple[bool, float]:
        row = rows[i % len(rows)]
        t0 = time.perf_counter()
        status, answer = post(f"{url}/invocations", records(row))
        return status == 200 and answer == alone[row["image_id"]][1], time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(200)))
    seconds = time.perf_counter() - t0
    latencies = sorted(s for _, s in results)
    p95 = latencies[int(0.95 * len(latencies)) - 1]
    held = all(ok for ok, _ in results)
    record(
        "200 requests from 8 concurrent clients",
        "serve",
        f"every answer equal to the request sent alone ({threads()}: {200 / seconds:.0f} req/s, "
        "median "
        f"{statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, peak RSS "
        f"{peak_rss_mb(pid):.0f} MB)",
        held,
    )
    assert held, sum(ok for ok, _ in results)


def threads() -> str:
    """The server's torch threads, as the figures depend on them (the suite pins one)."""
    count = os.environ.get("PNEUMOSEG_THREADS")
    return f"{count} torch thread{'s' if count != '1' else ''}" if count else "all cores"


ABUSE = ("100 MB body", "10,000 rows", "non-DICOM base64", "decompression bomb")


@pytest.mark.parametrize("case", ABUSE)
def test_abuse_gets_a_4xx_naming_the_row_and_serving_goes_on(
    served: Any, case: str, record: Record
) -> None:
    url, pid, project = served
    normal = dicom_rows(project)[0]
    before_status, before = post(f"{url}/invocations", records(normal))
    rss_before = peak_rss_mb(pid)
    if case == "100 MB body":
        blob = base64.b64encode(os.urandom(75_000_000)).decode()  # 100 MB of base64
        body, expect, names = records({"image_id": "huge", "dicom_b64": blob}), 413, "max_body_mb"
        del blob
    elif case == "10,000 rows":
        tiny = [[0, 40], [80, 120]]
        body = records(*({"image_id": f"r{i}", "image": tiny} for i in range(10_000)))
        expect, names = 400, "serving.max_rows"
    elif case == "non-DICOM base64":
        junk = base64.b64encode(b"<html>not a radiograph</html>" * 100).decode()
        body, expect, names = records({"image_id": "junk", "dicom_b64": junk}), 400, "junk:"
    else:
        data = base64.b64encode(bomb(project)).decode()
        body, expect, names = records({"image_id": "bomb", "dicom_b64": data}), 400, "bomb:"
    status, answer = post(f"{url}/invocations", body)
    del body
    grown = peak_rss_mb(pid) - rss_before
    after_status, after = post(f"{url}/invocations", records(normal))
    message = str(answer.get("message", ""))
    held = (
        status == expect
        and names in message
        and "Traceback" not in message
        and before_status == after_status == 200
        and after == before
        and grown < 100  # the 100 MB body is dropped chunk by chunk, never held
    )
    record(
        case,
        "serve",
        f"HTTP {expect} naming {names.rstrip(':')}, peak RSS +{max(grown, 0):.0f} MB, "
        "serves normally after",
        held,
    )
    assert held, (status, message[:300], grown, after_status)
