"""benchmarks/vdu_selectivity.py end to end on a tiny 16×16 model: runs, resume, tables, plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO
from vdu_lightning import ClassifierModule, DiffusionModule, ParameterPrior


def test_the_selectivity_benchmark_runs_settings_resumes_and_reports(
        tmp_path: Path, tiny_unet_config: dict) -> None:
    torch.manual_seed(0)
    model = DiffusionModule(unet={**tiny_unet_config, "sample_size": 16},
                            num_train_timesteps=100, sample_steps=2)
    model.save_pretrained(tmp_path / "ddpm")
    for name, architecture in (("classifier", "vgg"), ("second", "lenet")):
        classifier = ClassifierModule(in_channels=1, num_classes=10, width=8,
                                      architecture=architecture)
        if name == "classifier":
            # reads every image as a 1: class-1 runs have a grid of forgotten seeds, class-3
            # runs have none
            last = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)][-1]
            with torch.no_grad():
                last.bias[1] = 1e3
        classifier.save_pretrained(tmp_path / name)
    snapshots = [{n: p.detach() + 1e-2 * torch.randn(p.shape)
                  for n, p in model.unet.named_parameters()} for _ in range(2)]
    ParameterPrior.from_tensors(snapshots, "independent").save(tmp_path / "prior.safetensors")
    out = tmp_path / "runs"
    common = [
        "--pretrained", str(tmp_path / "ddpm"), "--prior", str(tmp_path / "prior.safetensors"),
        "--classifiers", str(tmp_path / "classifier"), str(tmp_path / "second"),
        "--max-steps", "2", "--num-samples", "8", "--out-dir", str(out)]
    script = str(REPO / "benchmarks" / "vdu_selectivity.py")

    def bench(*arguments: str) -> str:
        done = subprocess.run([sys.executable, script, *arguments, *common],
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    bench("classes", "--settings", "method", "prior-sgd-5e-2-hinge2", "--classes", "1", "3",
          "--seeds", "0", "--workers", "2", "--grids", str(tmp_path / "grids"))
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == ["method_c1_s0.json", "method_c3_s0.json",
                     "prior-sgd-5e-2-hinge2_c1_s0.json", "prior-sgd-5e-2-hinge2_c3_s0.json"]
    run = json.loads((out / "prior-sgd-5e-2-hinge2_c3_s0.json").read_text())
    assert run["steps"] == 2 and run["args"]["forget_class"] == [3]
    assert run["args"]["preconditioner"] == "prior" and run["args"]["hinge_factor"] == 2.0
    assert run["args"]["optimizer"] == "sgd" and run["args"]["lr"] == 5e-2
    assert sum(run["histogram_unlearned"]) == 8
    # each run's grids: the first seeds, and the seeds whose original is the forgotten digit
    # (none, when the original drew no such digit)
    for path in out.glob("*.json"):
        drawn = json.loads(path.read_text())
        digit, = drawn["args"]["forget_class"]
        forgotten = drawn["histogram_original"][digit]
        assert drawn["forgotten_grid_seeds"] == min(forgotten, 24)
        assert (tmp_path / "grids" / f"{path.stem}.png").is_file()
        assert (tmp_path / "grids" / f"{path.stem}_forgotten.png").is_file() == (forgotten > 0)
        assert forgotten == (8 if digit == 1 else 0)

    # A second call finds every run done: nothing is run again.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    report = bench("report", "--plot", str(tmp_path / "frontier.png"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == stamps
    ablation, per_class = report.strip().split("\n\n")
    # class 1, seed 0 of each setting in the ablation; every (setting, class) per class
    assert ablation.count("\n| method |") == 1
    assert ablation.count("\n| prior-sgd-5e-2-hinge2 |") == 1
    rows = per_class.splitlines()[2:]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| method", "1"], ["| method", "3"], ["| prior-sgd-5e-2-hinge2", "1"],
        ["| prior-sgd-5e-2-hinge2", "3"]]
    # the target column says what each run's numbers say
    for row in rows:
        setting, forget_class = row.strip("| ").split(" | ")[:2]
        numbers = json.loads((out / f"{setting}_c{forget_class}_s0.json").read_text())
        met = (numbers["pul"] >= 90 and numbers["u_fid_ratio"] <= 1.25
               and numbers["retained_drift"] <= 0.10)
        assert row.endswith("| yes |" if met else "| no |"), row
    assert (tmp_path / "frontier.png").stat().st_size > 1000
