"""VDU's selectivity on mnist5k: its options ablated, a setting over classes and seeds.

    python benchmarks/vdu_selectivity.py ablation --workers 2
    python benchmarks/vdu_selectivity.py classes --settings method prior-sgd-5e-2-hinge2 \\
        --classes 1 3 7 --seeds 0 1 2 --workers 2
    python benchmarks/vdu_selectivity.py classes --settings method --classes 0 1 2 3 4 5 6 7 8 9 \\
        --seeds 0
    python benchmarks/vdu_selectivity.py report --peers runs/bench/unlearning.json \\
        --plot docs/images/vdu_frontier.png

Each run is one process of vdu_mnist5k.py (500 paired samples, DDIM-25, both evaluators, the
classifier-free measures; one torch thread), written to ``--out-dir/<setting>_c<k>_s<seed>.json``
and skipped when that file exists, so an interrupted sweep resumes. ``report`` prints the
ablation table (class 1, seed 0), the per-class table (mean ± sd over seeds) with the
selectivity target checked per class, and draws PUL against the u-FID ratio for every run
and, given the peers benchmark's JSON, every peer method.
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

from vdu_lightning.files import atomic_file

HERE = Path(__file__).resolve().parent
TRAJECTORY = "runs/mnist5k/prior_trajectory.safetensors"
FINETUNE = "runs/mnist5k/prior_finetune.safetensors"
#: The method as written: γ 0.97, Adam lr 1e-5, 120 steps, trajectory prior (the old default).
METHOD = ["--gamma", "0.97", "--optimizer", "adam", "--lr", "1e-5", "--max-steps", "120"]
SGD = ["--gamma", "0.97", "--optimizer", "sgd", "--max-steps", "120"]
PRECONDITIONED = [*SGD, "--preconditioner", "prior"]

#: Setting name → (what it changes, its vdu_mnist5k.py flags); the trajectory prior unless
#: the flags name another.
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "method": ("the method as written: Adam 1e-5, plain P (the default)", METHOD),
    "adam-80-steps": ("budget: 80 steps", [*METHOD, "--max-steps", "80"]),
    "adam-3e-5": ("lr 3e-5", [*METHOD, "--lr", "3e-5"]),
    "adam-target": ("stop at held-out forget error 0.03 (≤ 400 steps)",
                    [*METHOD, "--max-steps", "400", "--target-forget-loss", "0.03"]),
    "adam-elbo": ("C_t: ELBO weights", [*METHOD, "--timestep-weighting", "elbo"]),
    "adam-band-300-800": ("P at t in 300..799 only",
                          [*METHOD, "--forget-timesteps", "300", "800"]),
    "adam-centred-3e-5": ("centred residual, lr 3e-5",
                          [*METHOD, "--residual", "centred", "--lr", "3e-5"]),
    "adam-hinge2-3e-5": ("hinge k = 2, lr 3e-5", [*METHOD, "--hinge-factor", "2", "--lr",
                                                  "3e-5"]),
    "adam-hinge2-band-500": ("hinge k = 2, t in 500..999, lr 3e-5",
                             [*METHOD, "--hinge-factor", "2", "--lr", "3e-5",
                              "--forget-timesteps", "500", "1000"]),
    "adam-up-blocks": ("only the up path moves", [*METHOD, "--include", "up_blocks.*",
                                                  "conv_norm_out.*", "conv_out.*"]),
    "adam-down-blocks": ("only the down path and middle move",
                         [*METHOD, "--include", "conv_in.*", "time_embedding.*",
                          "down_blocks.*", "mid_block.*"]),
    "adam-attention": ("only attention moves, lr 3e-5", [*METHOD, "--include", "*attentions*",
                                                         "--lr", "3e-5"]),
    "sgd-3e-3": ("SGD 3e-3", [*SGD, "--lr", "3e-3"]),
    "sgd-5e-3": ("SGD 5e-3", [*SGD, "--lr", "5e-3"]),
    "sgd-5e-3-hinge2": ("SGD 5e-3, hinge k = 2", [*SGD, "--lr", "5e-3", "--hinge-factor", "2"]),
    "sgd-1e-2-hinge2": ("SGD 1e-2, hinge k = 2", [*SGD, "--lr", "1e-2", "--hinge-factor", "2"]),
    "sgd-2e-2-hinge2": ("SGD 2e-2, hinge k = 2", [*SGD, "--lr", "2e-2", "--hinge-factor", "2"]),
    "prior-sgd-1e-2": ("SGD preconditioned by σ*², 1e-2", [*PRECONDITIONED, "--lr", "1e-2"]),
    "prior-sgd-3e-2": ("SGD preconditioned by σ*², 3e-2", [*PRECONDITIONED, "--lr", "3e-2"]),
    "prior-sgd-5e-2-hinge2": ("SGD preconditioned by σ*², 5e-2, hinge k = 2",
                              [*PRECONDITIONED, "--lr", "5e-2", "--hinge-factor", "2"]),
    "prior-sgd-7e-2-hinge2": ("SGD preconditioned, 7e-2, hinge k = 2",
                              [*PRECONDITIONED, "--lr", "7e-2", "--hinge-factor", "2"]),
    "prior-sgd-1e-1": ("SGD preconditioned, 1e-1", [*PRECONDITIONED, "--lr", "1e-1"]),
    "prior-sgd-gamma-0.95": ("SGD preconditioned, 5e-2, hinge k = 2, γ 0.95",
                             [*PRECONDITIONED, "--lr", "5e-2", "--hinge-factor", "2",
                              "--gamma", "0.95"]),
    "finetune-prior": ("SGD preconditioned, 5e-2, hinge k = 2, finetune prior (K = 3)",
                       [*PRECONDITIONED, "--lr", "5e-2", "--hinge-factor", "2",
                        "--prior", FINETUNE]),
}

#: The selectivity target for every class: PUL at least, u-FID ratio and drift at most.
TARGET = {"pul": 90.0, "u_fid_ratio": 1.25, "retained_drift": 0.10}


def meets_target(result: dict[str, Any]) -> bool:
    return (result["pul"] >= TARGET["pul"] and result["u_fid_ratio"] <= TARGET["u_fid_ratio"]
            and result["retained_drift"] <= TARGET["retained_drift"])


def run(setting: str, forget_class: int, seed: int, args: argparse.Namespace) -> Path:
    out = Path(args.out_dir) / f"{setting}_c{forget_class}_s{seed}.json"
    if out.exists():
        return out
    flags = SETTINGS[setting][1]
    command = [sys.executable, str(HERE / "vdu_mnist5k.py"), "--prior", args.prior, *flags,
               "--pretrained", args.pretrained, "--classifiers", *args.classifiers,
               "--forget-class", str(forget_class), "--seed", str(seed), "--num-samples",
               str(args.num_samples), "--sample-steps", "25", "--threads", "1", "--out",
               str(out)]
    if args.max_steps is not None:  # the last flag wins: instead of every setting's budget
        command += ["--max-steps", str(args.max_steps)]
    if args.grids:
        stem = f"{args.grids}/{setting}_c{forget_class}_s{seed}"
        command += ["--grid", f"{stem}.png", "--grid-forgotten", f"{stem}_forgotten.png"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{setting} class {forget_class} seed {seed} failed:\n"
                           f"{done.stderr[-3000:]}")
    print(f"{setting} class {forget_class} seed {seed}: {done.stdout.strip()[-300:]}",
          flush=True)
    return out


def launch(jobs: list[tuple[str, int, int]], args: argparse.Namespace) -> None:
    # The first run of each class before the others of that class: it fills the cache of
    # the original's samples (one entry per class), which the others then read.
    firsts = list({job[1]: job for job in reversed(jobs)}.values())
    with ThreadPoolExecutor(args.workers) as pool:
        for batch in (firsts, jobs):
            list(pool.map(lambda job: run(*job, args), batch))


def load(out_dir: str) -> list[dict[str, Any]]:
    results = []
    for path in sorted(Path(out_dir).glob("*_c*_s*.json")):
        setting, forget_class, seed = path.stem.rsplit("_", 2)
        result = json.loads(path.read_text())
        results.append({**result, "setting": setting, "forget_class": int(forget_class[1:]),
                        "seed": int(seed[1:])})
    return results


def ablation_table(results: list[dict[str, Any]]) -> str:
    rows = ["| setting | what changes | PUL % (VGG / LeNet) | u-FID ratio | drift | bits/dim "
            "1s / others (selectivity) | steps | histogram (0–9) |",
            "|---|---|---|---|---|---|---|---|"]
    for setting, (what, _) in SETTINGS.items():
        found = [r for r in results if r["setting"] == setting and r["forget_class"] == 1
                 and r["seed"] == 0]
        if not found:
            continue
        r = found[0]
        selectivity = r.get("bpd_selectivity")
        rows.append(
            f"| {setting} | {what} | {r['pul']:.1f} / {r['second_pul']:.1f} | "
            f"{r['u_fid_ratio']:.2f} / {r['second_u_fid_ratio']:.2f} | "
            f"{r['retained_drift']:.2f} | {r['bpd_forget_increase']:+.3f} / "
            f"{r['bpd_retain_increase']:+.3f} "
            f"({'–' if selectivity is None else f'{selectivity:.2f}'}) | {r['steps']} | "
            f"{' '.join(map(str, r['histogram_unlearned']))} |")
    return "\n".join(rows)


def _mean_sd(values: list[float], spec: str) -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"


def class_table(results: list[dict[str, Any]]) -> str:
    rows = ["| setting | class | seeds | PUL % (VGG) | PUL % (LeNet) | u-FID ratio | drift | "
            "target met |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["setting"], r["forget_class"]), []).append(r)
    for (setting, forget_class), runs in sorted(groups.items()):
        if sum(r["setting"] == setting for r in results) < 2:
            continue  # run once (class 1, seed 0): the ablation table has it
        met = all(meets_target(r) for r in runs)
        rows.append(
            f"| {setting} | {forget_class} | {len(runs)} | "
            f"{_mean_sd([r['pul'] for r in runs], '.1f')} | "
            f"{_mean_sd([r['second_pul'] for r in runs], '.1f')} | "
            f"{_mean_sd([r['u_fid_ratio'] for r in runs], '.2f')} | "
            f"{_mean_sd([r['retained_drift'] for r in runs], '.3f')} | "
            f"{'yes' if met else 'no'} |")
    return "\n".join(rows)


def frontier(results: list[dict[str, Any]], peers: list[dict[str, Any]], path: str) -> None:
    """PUL against the u-FID ratio: every VDU run of class 1, and every peer run."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    figure = Figure(figsize=(8.5, 4.6), layout="constrained")
    axes = figure.subplots()
    floor = -100.0
    ones = [r for r in results if r["forget_class"] == 1]
    highlighted = ("method", "prior-sgd-5e-2-hinge2")
    shown = [r for r in ones if r["setting"] not in highlighted]
    axes.scatter([max(r["pul"], floor) for r in shown], [r["u_fid_ratio"] for r in shown],
                 color="0.6", s=14, label="VDU options (the ablation)")
    for index, setting in enumerate(highlighted):
        mine = [r for r in ones if r["setting"] == setting]
        axes.scatter([r["pul"] for r in mine], [r["u_fid_ratio"] for r in mine],
                     color=f"C{index}", s=30, label=f"VDU {setting}")
    for index, method in enumerate(dict.fromkeys(p["method"] for p in peers), start=2):
        mine = [p for p in peers if p["method"] == method]
        axes.scatter([max(p["pul"], floor) for p in mine], [p["u_fid_ratio"] for p in mine],
                     color=f"C{index}", marker="s" if not mine[0]["data_constrained"] else "^",
                     s=30, label=f"peer: {method}" + ("" if mine[0]["data_constrained"]
                                                      else " (needs D_r)"))
    axes.fill_between([TARGET["pul"], 105], 0.1, TARGET["u_fid_ratio"], color="C2",
                      alpha=0.15, label="target: PUL ≥ 90, ratio ≤ 1.25")
    axes.set_xlabel(f"PUL (%, VGG-style evaluator; below {floor:.0f} drawn at it)")
    axes.set_ylabel("u-FID / original's (log scale)")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.set_xlim(floor - 5, 105)
    axes.set_ylim(0.5, 20)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["ablation", "classes", "report"])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["method"])
    parser.add_argument("--classes", nargs="+", type=int, default=[1, 3, 7])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--pretrained", default="runs/mnist5k/ddpm")
    parser.add_argument("--classifiers", nargs="+",
                        default=["runs/mnist5k/classifier", "runs/mnist5k/classifier_lenet"])
    parser.add_argument("--prior", default=TRAJECTORY, help="unless a setting names another")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="every run's budget instead of its setting's (smoke tests)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out-dir", default="runs/bench/selectivity")
    parser.add_argument("--grids", default="", help="a folder for each run's captioned grid")
    parser.add_argument("--peers", default=None, help="the JSON of benchmarks/unlearning.py")
    parser.add_argument("--plot", default=None, help="the frontier (PNG)")
    args = parser.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if args.what == "ablation":
        launch([(setting, 1, 0) for setting in SETTINGS], args)
    elif args.what == "classes":
        launch([(setting, forget_class, seed) for setting in args.settings
                for forget_class in args.classes for seed in args.seeds], args)
    results = load(args.out_dir)
    print(ablation_table(results), class_table(results), sep="\n\n")
    if args.plot:
        peers = json.loads(Path(args.peers).read_text())["runs"] if args.peers else []
        # The peers benchmark's own VDU run is the "method" setting, drawn already.
        frontier(results, [p for p in peers if "pul" in p and p["method"] != "vdu"], args.plot)


if __name__ == "__main__":
    main()
