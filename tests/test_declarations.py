"""dvc.yaml declares exactly what each stage reads: params keys, data files and code modules.

Every stage of the shared tiny pipeline ran through tests/stage_probe.py, which recorded each
params key path the stage read (a recording params object), each pneumoseg module it imported
and each file it opened. Here both directions are checked against dvc.yaml: what is read must
be declared (or on the explicit exempt list), and what is declared must be read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pipeline_helpers import ROOT, Pipeline

from pneumoseg.params import EXEMPT_KEYS, STAGE_PARAMS

pytestmark = pytest.mark.slow

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PACKAGE = ROOT / "src" / "pneumoseg"
# Files a stage may touch outside its declared deps and outs: the stores of record and the
# working folders (see pneumoseg.paths), and dvc.lock, read for the data-hash lineage tag only.
# (.pneumoseg: the OOF maps' component tables, a cache of what the declared maps give)
EXEMPT_PATHS = ("mlruns", "optuna", "checkpoints", "dvc.lock", ".pneumoseg")


def definition(stage: str) -> dict[str, Any]:
    """A stage's body: the ``do`` of a foreach, a matrix stage without its matrix."""
    entry = DVC[stage]
    if "foreach" in entry:
        return entry["do"]
    return {k: v for k, v in entry.items() if k != "matrix"}


def entries(items: list[Any]) -> list[str]:
    """Paths of a deps/outs/metrics/plots list (entries may be ``{path: options}``)."""
    return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]


def interpolated(stage: str) -> set[str]:
    """The params keys a stage's definition interpolates (``${data.processed_dir}``), and the
    params entries built by interpolation (``ensemble.members.${item.member}``, resolved for
    the tiny pipeline's member)."""
    body = definition(stage)
    text = yaml.safe_dump(body)
    keys = {k for k in re.findall(r"\$\{([\w.]+)\}", text) if k.split(".")[0] != "item"}
    built = [k for k in body.get("params", []) if "${" in k]
    return keys | {k.replace("${item.member}", MEMBER) for k in built}


def resolve(path: str, params: dict[str, Any], fold: int) -> str:
    def value(m: re.Match[str]) -> str:
        if m.group(1) in ("item", "item.fold"):
            return str(fold)
        if m.group(1) == "item.member":
            return MEMBER
        node: Any = params
        for key in m.group(1).split("."):
            node = node[key]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", value, path).rstrip("/")


def covered(key: str, by: set[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in by)


STAGE_NAMES = list(DVC)
MEMBER = "tiny"  # the tiny pipeline's ensemble member (tests/conftest.py)


def report_of(pipeline: Pipeline, stage: str) -> dict[str, Any]:
    """What the stage read in the tiny pipeline (fold 0 of a foreach/matrix stage)."""
    foreach = {"train": "train@0", "member": f"member@{MEMBER}-0"}
    foreach |= {"pseudo_label": "pseudo_label@0", "finetune": "finetune@0"}
    return pipeline.reports[foreach.get(stage, stage)]


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_params_read_are_declared_and_declared_are_read(
    stage: str, tiny_pipeline: Pipeline
) -> None:
    report = report_of(tiny_pipeline, stage)
    listed = [k for k in definition(stage).get("params", []) if "${" not in k]
    assert listed == list(STAGE_PARAMS[stage]), "dvc.yaml and params.STAGE_PARAMS differ"
    declared = set(listed) | interpolated(stage)
    reads = set(report["reads"])
    assert "<root>" not in reads, "the stage read the whole params object"
    undeclared = sorted(r for r in reads if not covered(r, declared | set(EXEMPT_KEYS)))
    assert not undeclared, f"{stage} reads keys dvc.yaml does not declare: {undeclared}"
    unread = sorted(
        d for d in declared if not any(covered(r, {d}) or covered(d, {r}) for r in reads)
    )
    assert not unread, f"{stage} declares keys it never reads: {unread}"


def is_package_marker(path: Path) -> bool:
    """An ``__init__.py`` with nothing but a docstring (no code to depend on)."""
    code = re.sub(r'^\s*(""".*?"""|#.*)', "", path.read_text(), flags=re.S).strip()
    return path.name == "__init__.py" and code in ("", "from __future__ import annotations")


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_code_deps_are_exactly_the_imported_modules(stage: str, tiny_pipeline: Pipeline) -> None:
    report = report_of(tiny_pipeline, stage)
    imported = {
        "src/pneumoseg/" + m.split("/pneumoseg/", 1)[1]
        for m in report["modules"]
        if not is_package_marker(Path(m))
    }
    deps = [d for d in entries(definition(stage)["deps"]) if d.startswith("src/")]

    def under(module: str, dep: str) -> bool:
        return module == dep or module.startswith(dep + "/")

    uncovered = sorted(m for m in imported if not any(under(m, d) for d in deps))
    unused = sorted(d for d in deps if not any(under(m, d) for m in imported))
    hint = f"; the exact list: {exact_code_deps(imported)}"
    assert not uncovered, f"{stage} imports modules dvc.yaml does not list: {uncovered}{hint}"
    assert not unused, f"{stage} lists code it never imports: {unused}{hint}"


def exact_code_deps(imported: set[str]) -> list[str]:
    """The imported modules, a package folder instead of its files when all of them are."""
    out = set(imported)
    for package in sorted({str(Path(m).parent) for m in imported}, key=len, reverse=True):
        files = {
            f"src/pneumoseg/{p.relative_to(PACKAGE)}"
            for p in (ROOT / package).rglob("*.py")
            if not is_package_marker(p)
        }
        if package != "src/pneumoseg" and files and files <= out:
            out = (out - files) | {package}
    return sorted(out)


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_files_read_and_written_are_declared(stage: str, tiny_pipeline: Pipeline) -> None:
    params = yaml.safe_load((tiny_pipeline.path / "params.yaml").read_text())
    report = report_of(tiny_pipeline, stage)
    d = definition(stage)
    deps = {resolve(p, params, 0) for p in entries(d.get("deps", [])) if not p.startswith("src/")}
    outs = {
        resolve(p, params, 0)
        for key in ("outs", "metrics", "plots")
        for p in entries(d.get(key, []))
    }

    def inside(path: str, places: set[str]) -> bool:
        """In a place, or in the temporary sibling an output is built in (``.<name>.*``)."""
        for place in places:
            folder, _, name = place.rpartition("/")
            temp = f"{folder}/.{name}." if folder else f".{name}."
            if path == place or path.startswith((place + "/", temp)):
                return True
        return False

    exempt = set(EXEMPT_PATHS)
    bad_reads = sorted(p for p in report["opened"]["r"] if not inside(p, deps | outs | exempt))
    assert not bad_reads, f"{stage} reads files dvc.yaml does not declare: {bad_reads}"
    bad_writes = sorted(p for p in report["opened"]["w"] if not inside(p, outs | exempt))
    assert not bad_writes, f"{stage} writes files dvc.yaml does not declare: {bad_writes}"


def test_exempt_keys_are_params_keys() -> None:
    from pneumoseg.params import MISSING, Params, get_path

    data = Params().model_dump(mode="json")
    assert [k for k in EXEMPT_KEYS if get_path(data, k) is MISSING] == []
    for stage, keys in STAGE_PARAMS.items():
        assert [k for k in keys if get_path(data, k) is MISSING] == [], stage
        assert not [k for k in keys if covered(k, set(EXEMPT_KEYS))], stage
