"""The benchmark scripts run end to end in their smoke modes and write complete results."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_overhead_tiny_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/overhead.py", "--tiny", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| **VDU / denoising** |" in result.stdout
    report = json.loads(out.read_text())
    assert report["mode"] == "tiny"

    step = report["step"]
    for key in ("vdu_step_s", "denoising_step_s", "stability_s", "ratio", "stability_fraction"):
        assert positive(step[key]), (key, step[key])
    assert step["ratio"] == step["vdu_step_s"] / step["denoising_step_s"]
    assert step["meets_target"] == (step["ratio"] <= step["target_ratio"])

    prior = report["prior"]
    assert sorted(prior["per_k"]) == ["2", "4"]
    for k, entry in prior["per_k"].items():
        assert entry["k"] == int(k)
        assert positive(entry["build_s"]) and positive(entry["peak_mb"]), entry
    assert positive(prior["peak_ratio"])
    assert prior["peak_ratio_ks"] == [4, 2]

    fisher = report["fisher"]
    assert positive(fisher["fisher_s"]) and positive(fisher["vs_prior"])
    assert fisher["prior_k"] == 4
    assert fisher["unet_passes"] == fisher["samples"] * fisher["timesteps_per_sample"] > 0


def test_the_sfd_step_benchmark_measures_a_tiny_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "sfd.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/sfd_sd_step.py", "--tiny", "--device", "cpu", "--steps", "1",
         "--precision", "fp32", "--pipeline", str(tmp_path / "sd"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert positive(rows[0]["iteration_s"]) and positive(rows[0]["peak_gib"])
    assert rows[0]["unet_parameters"] < 1e6  # the tiny sizes, not SD 1.5's
