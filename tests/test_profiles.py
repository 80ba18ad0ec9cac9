"""The shipped profiles (``profiles/*.sets``: ``dvc exp run -S`` lines) name only keys the code
reads, with values the params schema accepts, applied the way DVC applies them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pneumoseg.params import load_params
from pneumoseg.params.finetune import finetune_train

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "profiles").glob("*.sets"))


def apply_set(params: dict[str, Any], line: str) -> None:
    """``a.b.0.c=value`` as ``dvc exp run -S`` does: list items by index, a YAML value; the key
    must exist already (a typo would otherwise add a key nobody reads)."""
    path, _, raw = line.partition("=")
    tokens = path.strip().split(".")
    node: Any = params
    for i, token in enumerate(tokens):
        key: Any = int(token) if isinstance(node, list) else token
        if isinstance(node, dict) and key not in node:
            raise KeyError(f"{path}: not in params.yaml")
        if i == len(tokens) - 1:
            node[key] = yaml.safe_load(raw)
        else:
            node = node[key]


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_a_profile_gives_valid_params(profile: Path, tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    lines = [ln.strip() for ln in profile.read_text().splitlines()]
    sets = [ln for ln in lines if ln and not ln.startswith("#")]
    assert sets and all("=" in ln and " " not in ln for ln in sets)  # one shell word each
    for line in sets:
        apply_set(params, line)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params(tmp_path / "params.yaml")
    assert loaded.data.raw_dir == "data/raw/siim" and loaded.train.folds == [0, 1, 2, 3, 4]
    assert [p.size for p in loaded.train.parts] == [512, 1024]
    # with pseudo-labels on, the fine-tuned folds predict at the fold models' size (1024 here):
    # submit, register and predict mix fine-tuned and plain folds
    params["pseudo_label"]["folds"] = [0]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tuned = finetune_train(load_params(tmp_path / "params.yaml"))
    assert [p.size for p in tuned.parts] == [1024]


def test_apply_set_refuses_an_unknown_key() -> None:
    with pytest.raises(KeyError, match="train.modle.encoder"):
        apply_set({"train": {"model": {}}}, "train.modle.encoder=resnet34")
