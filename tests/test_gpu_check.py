"""``make gpu-check`` (issue 29): the GPU check's plumbing runs on the CPU in every ``make
test``; on a CUDA machine the tests marked ``gpu`` assert what it must show (and keep its JSON
as ``gpu-check.json``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_helpers import env

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "bench/gpu_check.py"


def gpu_check(out: Path, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(CHECK), *args, "--out", str(out)],
        capture_output=True, text=True, env=env(), timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_gpu_check_runs_its_plumbing_on_the_cpu(tmp_path: Path) -> None:
    report = gpu_check(
        tmp_path / "check.json",
        *("--device", "cpu", "--sizes", "64", "--batch", "2", "--steps", "2", "--images", "4"),
    )
    assert report["device"] == "cpu" and report["model"]["encoder"] == "resnet34"  # the profile's
    (train,) = report["train"]
    assert train["size"] == 64 and len(train["losses"]) == 2 and train["loss_finite"]
    assert train["autocast_dtype"] == ["float32"] and train["peak_memory_mib"] is None
    half = report["half_vs_float"]
    assert half["half_dtype"] == "bfloat16" and 0 < half["max_probability_difference"] < 1
    assert 0 < half["pixels_agreeing"] <= 1 and half["masks"] == 2
    assert {k: report["ddp"][k] for k in ("backend", "world_size", "ok")} == {
        "backend": "gloo", "world_size": 1, "ok": True,
    }  # fmt: skip
    predict = report["predict"]
    assert predict["images"] == 4 and predict["ratio_to_model_only"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
def test_a_gpu_trains_at_1024_in_float16_and_predicts_like_float32() -> None:
    report = gpu_check(ROOT / "gpu-check.json", "--device", "cuda")
    assert [t["size"] for t in report["train"]] == [512, 1024]
    for train in report["train"]:
        assert train["loss_finite"], train["losses"]
        assert train["autocast_dtype"] == ["float16"]  # the network really ran in half
        assert train["peak_memory_mib"] > 0
    half = report["half_vs_float"]
    assert half["max_probability_difference"] < 0.02 and half["pixels_agreeing"] > 0.999
    assert report["ddp"]["backend"] == "nccl" and report["ddp"]["ok"], report["ddp"]
    assert report["predict"]["ratio_to_model_only"] > 0
