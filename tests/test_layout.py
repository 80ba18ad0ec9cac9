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


def test_modules_are_small_and_stages_thin() -> None:
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in MODULES}
    assert {n: s for n, s in sizes.items() if s > 400} == {}
    assert {n: s for n, s in sizes.items() if is_stage(n) and s > 200} == {}


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
