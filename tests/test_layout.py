"""The shape of the package: stages are thin and independent, modules stay small, no private
Optuna API. Static checks of the source (ast), so they run in milliseconds."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pneumoseg"
MODULES = sorted(PACKAGE.rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every pneumoseg module a file imports, at any depth (function-level imports too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pneumoseg")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pneumoseg"):
            out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module or ""}
    return out


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def is_stage(name: str) -> bool:
    return name.startswith("pneumoseg.stages.") and name != "pneumoseg.stages.__init__"


def test_only_the_cli_imports_stages_and_no_stage_imports_another() -> None:
    offenders = []
    for path in MODULES:
        name = module_name(path)
        stages = {m for m in imported(path) if is_stage(m)}
        if name == "pneumoseg.cli":
            continue
        if stages:
            offenders.append(f"{name} imports {sorted(stages)}")
    assert offenders == []


def test_functions_stay_within_the_complexity_limits() -> None:
    """ruff's C901 (complexity 15), PLR0912 (15 branches) and PLR0915 (60 statements) on the
    package, as configured in pyproject.toml: a function that does two jobs is split."""
    import subprocess
    import sys

    root = PACKAGE.parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "C901,PLR0912,PLR0915", str(PACKAGE)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_no_private_optuna_api() -> None:
    for path in MODULES:
        text = path.read_text()
        assert "._storage" not in text and "._trial_id" not in text, path


def test_the_cli_table_points_at_existing_functions() -> None:
    from pneumoseg.cli import COMMANDS

    for name, command in COMMANDS.items():
        module, _, function = command.target.partition(":")
        assert module.startswith(("pneumoseg.stages.", "pneumoseg.commands.")), name
        assert callable(command.runner()), name
