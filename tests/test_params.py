"""params.yaml validation, overrides, the CLI's exit codes and its import hygiene."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pneumoseg.params import Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def repo_params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def error_of(path: Path, overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(ParamsError) as info:
        load_params(path, overrides)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def pneumoseg(
    *args: str, cwd: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pneumoseg", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | (extra_env or {}),
    )


def test_defaults_validate() -> None:
    params = Params()
    assert params.split.n_folds >= 2 and params.data.size >= 32
    assert Params.model_validate(params.model_dump()) == params


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("")
    assert load_params(tmp_path / "params.yaml") == Params()


def test_repo_params_yaml_validates_and_is_read() -> None:
    raw = repo_params()
    params = load_params(ROOT / "params.yaml")
    assert params.data.size == raw["data"]["size"]
    assert params.split.n_folds == raw["split"]["n_folds"]
    assert params.data.rle_dialect == raw["data"]["rle_dialect"]
    assert params.train.parts[0].lr == raw["train"]["parts"][0]["lr"]
    assert params.demo.positive_fraction == raw["demo"]["positive_fraction"]


@pytest.mark.parametrize(
    "section, expected",
    [
        ({"data": {"sise": 128}}, "params.yaml: data.sise: unknown key"),
        ({"colour": "red"}, "params.yaml: colour: unknown key"),
        ({"data": {"clahe": {"clip": 2}}}, "params.yaml: data.clahe.clip: unknown key"),
        ({"train": {"parts": [{"lrr": 0.1}]}}, "params.yaml: train.parts[0].lrr: unknown key"),
    ],
)
def test_unknown_key(tmp_path: Path, section: dict[str, Any], expected: str) -> None:
    message = error_of(write_yaml(tmp_path / "params.yaml", section))
    assert message == expected


@pytest.mark.parametrize(
    "section, path",
    [
        ({"split": {"n_folds": "five"}}, "split.n_folds"),
        ({"data": {"size": [256]}}, "data.size"),
        ({"data": {"clahe": {"enabled": "maybe"}}}, "data.clahe.enabled"),
        ({"data": {"rle_dialect": "rowwise"}}, "data.rle_dialect"),
        ({"train": {"parts": [{"epochs": "many"}]}}, "train.parts[0].epochs"),
        ({"data": 3}, "data"),
    ],
)
def test_wrong_type(tmp_path: Path, section: dict[str, Any], path: str) -> None:
    message = error_of(write_yaml(tmp_path / "params.yaml", section))
    assert message.startswith(f"params.yaml: {path}: ")
    assert "\n" not in message


@pytest.mark.parametrize(
    "section, expected",
    [
        ({"split": {"n_folds": 1}}, "params.yaml: split.n_folds: must be >= 2"),
        (
            {"data": {"max_failed_fraction": 1.5}},
            "params.yaml: data.max_failed_fraction: must be <= 1",
        ),
        ({"data": {"workers": 0}}, "params.yaml: data.workers: must be >= 1"),
        ({"data": {"size": 8}}, "params.yaml: data.size: must be >= 32"),
        ({"train": {"parts": [{"lr": 0}]}}, "params.yaml: train.parts[0].lr: must be > 0"),
        (
            {"data": {"clahe": {"tile_grid": 65}}},
            "params.yaml: data.clahe.tile_grid: must be <= 64",
        ),
    ],
)
def test_out_of_range(tmp_path: Path, section: dict[str, Any], expected: str) -> None:
    assert error_of(write_yaml(tmp_path / "params.yaml", section)) == expected


def test_cross_field_rule_names_its_key(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "params.yaml", {"split": {"n_folds": 2}, "train": {"folds": [0, 3]}}
    )
    message = error_of(path)
    assert message.startswith("params.yaml: train.folds: ") and "\n" not in message


def test_classification_head_needs_its_loss(tmp_path: Path) -> None:
    head = {"train": {"model": {"classification_head": True}, "parts": [{"loss": {"cls": 0}}]}}
    message = error_of(write_yaml(tmp_path / "params.yaml", head))
    assert message.startswith("params.yaml: train.model.classification_head: needs loss.cls > 0")
    head["train"]["parts"][0]["loss"]["cls"] = 0.5
    load_params(write_yaml(tmp_path / "params.yaml", head))


def test_invalid_yaml_and_missing_file_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [1\n")
    message = error_of(bad)
    assert message.startswith("params.yaml:") and "invalid YAML" in message and "\n" not in message
    assert "not found" in error_of(tmp_path / "nope.yaml")
    bad.write_text("- 1\n- 2\n")
    assert "mapping" in error_of(bad)


def test_overrides_apply(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "params.yaml", repo_params())
    params = load_params(
        path,
        {
            "data.size": 128,
            "split.n_folds": 3,
            "data.raw_dir": "somewhere/else",
            "train.parts[0].epochs": 2,
            "data.rle_csv": None,  # None: flag not given, keep the file's value
            "split.seed": None,
        },
    )
    assert params.data.size == 128
    assert params.split.n_folds == 3
    assert params.data.raw_dir == "somewhere/else"
    assert params.train.parts[0].epochs == 2
    assert params.data.rle_csv is None
    assert params.split.seed == repo_params()["split"]["seed"]
    assert load_params(path).data.size == repo_params()["data"]["size"]  # file untouched


def test_overrides_are_validated(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "params.yaml", repo_params())
    assert error_of(path, {"split.n_folds": 1}) == "params.yaml: split.n_folds: must be >= 2"
    assert error_of(path, {"data.rle_dialect": "diagonal"}).startswith(
        "params.yaml: data.rle_dialect: "
    )
    assert "index 5 out of range" in error_of(path, {"train.parts[5].lr": 0.1})
    assert error_of(path, {"data.sise": 1}) == "params.yaml: data.sise: unknown key"


def test_cli_bad_params_exit_2_before_any_work(tmp_path: Path) -> None:
    params = repo_params()
    params["split"]["n_folds"] = 1
    write_yaml(tmp_path / "bad.yaml", params)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = pneumoseg("--params", "bad.yaml", "split", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "bad.yaml: split.n_folds: must be >= 2"
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_cli_bad_flag_value_exit_2(tmp_path: Path) -> None:
    write_yaml(tmp_path / "params.yaml", repo_params())
    proc = pneumoseg("convert", "--size", "4", "--out", "processed", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "params.yaml: data.size: must be >= 32"
    assert not (tmp_path / "processed").exists()


def test_cli_help_lists_the_stages(tmp_path: Path) -> None:
    proc = pneumoseg("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("demo", "convert", "split"):
        assert command in proc.stdout
    proc = pneumoseg("convert", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "--workers" in proc.stdout and "data.workers" in proc.stdout


def test_cli_version_examples_completion_and_debug(tmp_path: Path) -> None:
    from importlib.metadata import version

    from pneumoseg.cli import COMMANDS

    proc = pneumoseg("--version", cwd=tmp_path)
    assert proc.stdout.strip() == f"pneumoseg {version('pneumoseg')}"
    for name, command in COMMANDS.items():  # every command shows how it is called
        assert command.examples, name
        assert any(e.split()[:2] == ["pneumoseg", name] for e in command.examples), name
    proc = pneumoseg("models", "--help", cwd=tmp_path)
    assert "examples:\n  pneumoseg models list\n" in proc.stdout
    proc = pneumoseg("--print-completion", "bash", cwd=tmp_path)
    assert proc.returncode == 0 and "complete" in proc.stdout
    assert all(name in proc.stdout for name in COMMANDS)
    # an error is one line; --debug (or PNEUMOSEG_DEBUG=1) adds the traceback, redacted
    write_yaml(tmp_path / "params.yaml", repo_params())
    args = ("score", "--submission", "missing.csv", "--truth", "missing.csv")
    plain = pneumoseg(*args, cwd=tmp_path)
    assert plain.returncode == 1 and len(plain.stderr.strip().splitlines()) == 1
    assert plain.stderr.startswith("pneumoseg score: error: ") and "missing.csv" in plain.stderr
    for debug in (pneumoseg("--debug", *args, cwd=tmp_path),
                  pneumoseg(*args, cwd=tmp_path, extra_env={"PNEUMOSEG_DEBUG": "1"})):  # fmt: skip
        assert debug.returncode == 1
        assert "Traceback (most recent call last)" in debug.stderr
        assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_light_modules_do_not_import_torch_or_mlflow() -> None:
    code = (
        "import sys\n"
        "import pneumoseg.cli, pneumoseg.rle, pneumoseg.params, pneumoseg.dicom\n"
        "import pneumoseg.stages.convert, pneumoseg.stages.split\n"
        "from pneumoseg.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow'))\n"
        "print(','.join(heavy) or 'clean')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"


def test_schema_defaults_are_the_shipped_params(tmp_path: Path) -> None:
    """One source of defaults: a params file that sets nothing behaves like the shipped one."""
    from pneumoseg.params import flatten

    shipped = flatten(load_params(ROOT / "params.yaml").model_dump(mode="json"))
    (tmp_path / "params.yaml").write_text("{}\n")
    defaults = flatten(load_params(tmp_path / "params.yaml").model_dump(mode="json"))
    differ = {k for k in shipped.keys() | defaults.keys() if shipped.get(k) != defaults.get(k)}
    assert not differ, sorted(differ)


def test_a_library_traceback_in_the_log_is_one_line() -> None:
    import logging

    from pneumoseg.console import OneLineFormatter

    try:
        raise RuntimeError("libjpeg error code '-1038' returned from Decode()")
    except RuntimeError:
        record = logging.getLogger("pydicom").makeRecord(
            "pydicom", logging.ERROR, __file__, 1, "decoding failed", (), sys.exc_info()
        )
    line = OneLineFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    error = "RuntimeError: libjpeg error code '-1038' returned from Decode()"
    assert line == f"ERROR pydicom: decoding failed ({error})"


@pytest.mark.parametrize(
    "train, expected",
    [
        ({"checkpoint": {"final": "best"}}, "checkpoint.final: 'best' ranks epochs on a"),
        ({"checkpoint": {"final": "average_top_k"}}, "checkpoint.final: 'average_top_k' ranks"),
        (
            {"parts": [{"scheduler": {"name": "plateau"}}]},
            "parts: the plateau scheduler watches a validation split",
        ),
    ],
)
def test_no_selection_refuses_what_needs_a_validation_split(
    tmp_path: Path, train: dict[str, Any], expected: str
) -> None:
    """``selection.mode: none`` (the shipped default) has no images to rank epochs on: a final
    weight choice or a scheduler that needs them is refused, naming the key."""
    base = {"selection": {"mode": "none"}, "swa": {"epochs": 0}, "checkpoint": {"final": "last"}}
    section = {"train": base | train}
    message = error_of(write_yaml(tmp_path / "params.yaml", section))
    assert message.startswith(f"params.yaml: train: {expected}") or message.startswith(
        f"params.yaml: train.{expected}"
    ), message
    assert "\n" not in message
    section["train"]["selection"] = {"mode": "inner"}  # with a validation split: accepted
    load_params(write_yaml(tmp_path / "params.yaml", section))
