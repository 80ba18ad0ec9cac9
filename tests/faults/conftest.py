"""The fault-injection suite's table: every case records what it injected, into which stage,
what it checked and whether it held; the session writes the table to
``tests/faults/last-run.md`` and, under ``make faults`` (``PNEUMOSEG_FAULT_README=1``), into the
README between the ``faults:begin``/``faults:end`` markers."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
README = HERE.parents[1] / "README.md"
ROWS: dict[tuple[str, str, str], list[bool]] = defaultdict(list)


@pytest.fixture
def record() -> Callable[[str, str, str, bool], None]:
    """``record(fault, stage, checked, held)``: one outcome of a case (seeds add up)."""

    def add(fault: str, stage: str, checked: str, held: bool) -> None:
        ROWS[(fault, stage, checked)].append(bool(held))

    return add


def table() -> str:
    lines = ["| fault | stage | what was checked | result |", "|---|---|---|---|"]
    for (fault, stage, checked), outcomes in ROWS.items():
        n, ok = len(outcomes), sum(outcomes)
        result = ("held" if ok == n else "FAILED") if n == 1 else f"{ok}/{n} held"
        lines.append(f"| {fault} | {stage} | {checked} | {result} |")
    return "\n".join(lines) + "\n"


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not ROWS:
        return
    (HERE / "last-run.md").write_text(table())
    if os.environ.get("PNEUMOSEG_FAULT_README") == "1":
        text = README.read_text()
        begin, end = "<!-- faults:begin -->\n", "<!-- faults:end -->"
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        README.write_text(head + begin + table() + end + tail)
