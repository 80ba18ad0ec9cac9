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


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (function-level and type-only imports too; a
    name imported from a module counts as the module; a package is its ``__init__``)."""
    modules = {module_name(p).removesuffix(".__init__"): p for p in MODULES}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {resolve(m) for m in imported(path)}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


# The one cycle left, until the training callbacks and the end-of-training record take an
# explicit context instead of the trainer (issue 30, item 3). Any other cycle fails.
KNOWN_CYCLES = [
    ["pneumoseg.training.callbacks", "pneumoseg.training.record", "pneumoseg.training.trainer"]
]


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_counting_imports_inside_functions() -> None:
    """postprocess is a chain (triplet < components < scorer < search < blend < oof) and the
    whole package has no other cycle either."""
    graph = import_graph()
    assert cycles(graph) == KNOWN_CYCLES
    chain = ["triplet", "components", "scorer", "search", "blend", "oof"]
    for k, lower in enumerate(chain):
        above = {f"pneumoseg.postprocess.{m}" for m in chain[k + 1 :]}
        assert not graph[f"pneumoseg.postprocess.{lower}"] & above, lower


def test_no_private_name_is_imported_from_another_module() -> None:
    offenders = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pneumoseg"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    offenders.append(f"{module_name(path)}: {node.module} {private}")
    assert offenders == []
