"""Progress: bars on a terminal, plain periodic lines in a log (``dvc repro``), off on request."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
from pipeline_helpers import BIN, make_project, run

from pneumoseg.progress import progress_bar, progress_mode


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_mode_follows_the_terminal_the_flag_and_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PNEUMOSEG_PROGRESS", raising=False)
    assert progress_mode(True, Terminal()) == "bars"
    assert progress_mode(False, Terminal()) == "lines"  # -q, as dvc.yaml runs the stages
    assert progress_mode(True, io.StringIO()) == "lines"  # a log, a pipe
    monkeypatch.setenv("PNEUMOSEG_PROGRESS", "off")
    assert progress_mode(True, Terminal()) == "off"
    monkeypatch.setenv("PNEUMOSEG_PROGRESS", "loud")
    with pytest.raises(ValueError, match="^PNEUMOSEG_PROGRESS='loud': expected one of bars"):
        progress_mode()


def test_lines_mode_logs_whole_lines_with_count_rate_and_eta(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PNEUMOSEG_PROGRESS", "lines")
    monkeypatch.setenv("PNEUMOSEG_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="pneumoseg.progress"):
        assert sum(progress_bar(range(4), desc="oof")) == 6
    lines = [r.getMessage() for r in caplog.records if r.name == "pneumoseg.progress"]
    assert all("\r" not in line and "\n" not in line for line in lines)
    assert lines[0].startswith("oof: 0/4 (0%) [00:00<")
    assert lines[-1].startswith("oof: 4/4 (100%) [00:00<00:00, ")
    assert lines[-1].endswith("img/s]")
    caplog.clear()
    monkeypatch.setenv("PNEUMOSEG_PROGRESS", "off")
    with caplog.at_level(logging.INFO, logger="pneumoseg.progress"):
        assert list(progress_bar(range(3), desc="oof")) == [0, 1, 2]
    assert not caplog.records


def test_dvc_repro_shows_progress_lines_without_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stages run with -q from dvc.yaml: under a `dvc repro` whose output is a pipe, the
    DICOM conversion reports lines (start, every interval, end)."""
    project = make_project(tmp_path / "p")
    monkeypatch.setenv("PNEUMOSEG_PROGRESS_SECONDS", "0")  # env() passes it on
    proc = run([str(BIN / "dvc"), "repro", "convert"], cwd=project)
    printed = proc.stdout + proc.stderr
    line = "^INFO pneumoseg.progress: "
    assert re.search(line + r"demo: 30/30 \(100%\)", printed, re.M), printed[-2000:]
    assert re.search(line + r"convert: 0/30 \(0%\)", printed, re.M)
    assert re.search(line + r"convert: 30/30 \(100%\) \[\d\d:\d\d<00:00, ", printed, re.M)
    monkeypatch.setenv("PNEUMOSEG_PROGRESS", "off")
    quiet = run([str(BIN / "dvc"), "repro", "-f", "convert"], cwd=project)
    assert "pneumoseg.progress" not in quiet.stdout + quiet.stderr
    assert "convert: 30 converted" in quiet.stdout  # the result line stays
