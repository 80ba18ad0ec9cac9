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
# (fault, stage, checked) -> one (held, landed) per run of the case; ``landed``: a timed fault
# (a kill, a signal) hit the stage mid-work, after its first progress line, before its end
ROWS: dict[tuple[str, str, str], list[tuple[bool, bool]]] = defaultdict(list)


@pytest.fixture
def record() -> Callable[..., None]:
    """``record(fault, stage, checked, held, landed=True)``: one outcome of a case (seeds add
    up). A timed fault that did not land mid-work does not count as held."""

    def add(fault: str, stage: str, checked: str, held: bool, landed: bool = True) -> None:
        ROWS[(fault, stage, checked)].append((bool(held) and bool(landed), bool(landed)))

    return add


def table() -> str:
    lines = ["| fault | stage | what was checked | result |", "|---|---|---|---|"]
    for (fault, stage, checked), outcomes in ROWS.items():
        n, ok, landed = len(outcomes), sum(h for h, _ in outcomes), sum(a for _, a in outcomes)
        result = ("held" if ok == n else "FAILED") if n == 1 else f"{ok}/{n} held"
        if landed < n:
            result += f" ({n - landed} of {n} did not land mid-work)"
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
