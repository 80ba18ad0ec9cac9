"""Print the coverage summary of ``src/pneumoseg`` and the modules below a floor.

Run after a test run that collected coverage (``make coverage``); the stages the tests start as
subprocesses are measured too (``[tool.coverage.run] patch = ["subprocess"]``)::

    python tests/coverage_summary.py 70
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import coverage


def below(report: dict, floor: float) -> list[tuple[str, float, int]]:
    """(module, percent covered, statements missed) of each file under ``floor`` percent."""
    rows = []
    for path, entry in report["files"].items():
        summary = entry["summary"]
        if summary["num_statements"] and summary["percent_covered"] < floor:
            module = path.split("src/", 1)[-1]
            rows.append((module, summary["percent_covered"], summary["missing_lines"]))
    return sorted(rows, key=lambda row: row[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("floor", type=float, nargs="?", default=70.0, help="percent")
    args = parser.parse_args()
    cov = coverage.Coverage()
    cov.load()
    cov.combine(strict=False)  # the subprocesses' files, when pytest-cov did not combine them
    total = cov.report(skip_covered=False, skip_empty=True)
    with tempfile.TemporaryDirectory() as tmp:
        cov.json_report(outfile=str(Path(tmp) / "coverage.json"))
        report = json.loads((Path(tmp) / "coverage.json").read_text())
    rows = below(report, args.floor)
    print(f"\nsrc/pneumoseg: {total:.1f}% of statements run by the tests")
    print(f"{len(rows)} modules below {args.floor:g}%:" if rows else f"none below {args.floor:g}%")
    for module, percent, missed in rows:
        print(f"  {module:<48} {percent:5.1f}%  ({missed} statements not run)")


if __name__ == "__main__":
    main()
