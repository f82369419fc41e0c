"""Forgetting twice: one digit after another, and two digits at once, with VDU on mnist5k.

    python benchmarks/sequential.py --seeds 0 1 2 --workers 2 --out runs/bench/sequential.json

Per seed, five runs of vdu_mnist5k.py with the method's settings (γ 0.97, Adam 1e-5, 120
steps, the trajectory prior), each evaluated against the *original* model (500 paired
samples, DDIM-25, both evaluators):

* ``first``: forget A from the original (exported: the start of the next two);
* ``then-original-prior``: forget B from ``first``'s model with the prior as built (its mean
  is the original's weights: the stability term pulls towards the model that still draws A);
* ``then-recentred-prior``: the same with the prior's mean moved to ``first``'s weights (same
  variances): what has been forgotten is the new anchor;
* ``both``: forget A and B at once from the original;
* ``B-alone``: forget B from the original (how much of B one run forgets by itself).

Every run is evaluated with A and B as the forgotten digits (the retained ones are the other
eight, alike for all runs), and its PUL is read per digit from the first evaluator's
histograms: forgetting B must not bring A back, and the retained digits must keep their
quality (u-FID ratio, drift).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vdu_lightning.files import atomic_write_text

HERE = Path(__file__).resolve().parent
METHOD = ["--gamma", "0.97", "--optimizer", "adam", "--lr", "1e-5", "--max-steps", "120"]


def runs(a: int, b: int, folder: Path) -> dict[str, tuple[list[str], str | None]]:
    """Run name → (its flags, the run it starts from or None for the original)."""
    return {
        "first": (["--forget-class", str(a), "--export", str(folder / "first")], None),
        "then-original-prior": (["--forget-class", str(b), "--prior-mean", "checkpoints"],
                                "first"),
        "then-recentred-prior": (["--forget-class", str(b), "--prior-mean", "start"], "first"),
        "both": (["--forget-class", str(a), str(b)], None),
        "B-alone": (["--forget-class", str(b)], None),
    }


def run_one(args: argparse.Namespace, seed: int, name: str) -> dict[str, Any]:
    folder = Path(args.out).with_suffix("") / f"seed{seed}"
    out = folder / f"{name}.json"
    flags, start = runs(args.a, args.b, folder)[name]
    if not out.is_file():
        pretrained = args.original if start is None else str(folder / start)
        command = [sys.executable, str(HERE / "vdu_mnist5k.py"), *METHOD, "--prior", args.prior,
                   "--pretrained", pretrained, "--original", args.original,
                   "--classifiers", *args.classifiers, "--seed", str(seed),
                   "--num-samples", str(args.num_samples), "--sample-steps", "25",
                   "--threads", "1", "--evaluate-classes", str(args.a), str(args.b), *flags,
                   "--grid", str(out.with_suffix(".png")), "--out", str(out)]
        if args.max_steps is not None:  # the last flag wins: instead of the method's 120
            command[-2:-2] = ["--max-steps", str(args.max_steps)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{name} seed {seed} failed:\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    evaluator = next(iter(result["paired"]["evaluators"].values()))
    before, after = evaluator["histogram_original"], evaluator["histogram_unlearned"]
    per_digit = {d: (100 * (1 - after[d] / before[d]) if before[d] else None)
                 for d in (args.a, args.b)}
    row = {"run": name, "seed": seed, "pul_a": per_digit[args.a], "pul_b": per_digit[args.b],
           "u_fid_ratio": result["u_fid_ratio"], "retained_drift": result["retained_drift"]}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict[str, Any]], a: int, b: int) -> str:
    lines = [f"| run | PUL digit {a} (%) | PUL digit {b} (%) | u-FID / original | "
             "retained drift |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]

        def stat(key: str, spec: str) -> str:
            values = [r[key] for r in mine if r[key] is not None]
            if not values:  # the original drew none of that digit: no PUL
                return "n/a"
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):{spec}} ± {spread:{spec}}"
        lines.append(f"| {name} | {stat('pul_a', '.1f')} | {stat('pul_b', '.1f')} | "
                     f"{stat('u_fid_ratio', '.2f')} | {stat('retained_drift', '.3f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", default="runs/mnist5k/ddpm")
    parser.add_argument("--prior", default="runs/mnist5k/prior_trajectory.safetensors")
    parser.add_argument("--classifiers", nargs="+",
                        default=["runs/mnist5k/classifier", "runs/mnist5k/classifier_lenet"])
    parser.add_argument("--a", type=int, default=1, help="the digit forgotten first")
    parser.add_argument("--b", type=int, default=7, help="the digit forgotten second")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--max-steps", type=int, default=None, help="instead of 120")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/sequential.json")
    args = parser.parse_args()
    names = list(runs(args.a, args.b, Path()))
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        # "first" of each seed before the runs that start from it.
        rows += pool.map(lambda seed: run_one(args, seed, "first"), args.seeds)
        jobs = [(seed, name) for seed in args.seeds for name in names if name != "first"]
        rows += pool.map(lambda job: run_one(args, *job), jobs)
    rows.sort(key=lambda r: (names.index(r["run"]), r["seed"]))
    report = table(rows, args.a, args.b)
    print(report)
    atomic_write_text(args.out, json.dumps({"settings": vars(args), "rows": rows,
                                            "table": report}, indent=1) + "\n")


if __name__ == "__main__":
    main()
