"""VDU and its peers (docs/method.md §7) on one pre-trained model, forget set and step budget.

    python benchmarks/unlearning.py --seeds 0 1 2 --workers 2 \
        --out runs/bench/unlearning.json --plot docs/images/unlearning_pul_vs_ufid.png
    python benchmarks/unlearning.py --methods sfd sid --seeds 0 --out runs/bench/sfd.json

Each method's hyperparameters are those of its config, configs/mnist5k/<method>.yaml
(model and data ``init_args``); the benchmark overrides only the pre-trained model, the step
budget and the seed. Every (method, seed) runs in a fresh process (``--run``), so its peak
memory is its own; ``--workers`` runs that many at once with one torch thread each. Measured:
the time before the first step (what a method computes first: SalUn's mask, EWC's Fisher and
replay set), the training time, the peak memory, and the paired evaluation of
paired_evaluation.py (by two evaluators: PUL, u-FID and its ratio to the original's,
retained-class drift; with none: the bound of held-out real forget and retain images, the
same-seed sample change, the background shift).
VDU's prior comes from ``PriorSnapshot`` during pre-training: its cost is the overhead.py
build time, not counted here. ``--model-overrides`` / ``--data-overrides`` (JSON) change
every method's arguments, e.g. for the test that runs it on a tiny model.

SFD and plain SiD (docs/method.md §6) distil the label-conditional ``--teacher`` into one-step
generators for their configs' number of steps; one_step_evaluation.py scores them against the
teacher's DDIM-50 (UA, class consistency, u-FID, images per second) in a table of their own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from one_step_evaluation import evaluate_one_step, save_grid
from paired_evaluation import evaluate, save_before_after

from vdu_lightning import ForgetSetDataModule, ParameterPrior, SFDModule
from vdu_lightning.callbacks import UnlearningGuard
from vdu_lightning.files import atomic_file, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PEERS = ("vdu", "gradient_ascent", "anchor", "ewc", "salun", "retain_finetune")
DISTILLATIONS = ("sfd", "sid")
METHODS = PEERS + DISTILLATIONS


class Clock(pl.Callback):
    """Seconds from fit's start to the first step (a method's preparation), then to the end."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()
        self.first_step: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.first_step is None:
            self.first_step = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = time.perf_counter()


def method_config(method: str, configs: Path) -> dict[str, Any]:
    config = yaml.safe_load((configs / f"{method}.yaml").read_text())
    return {"model": config["model"], "data": config["data"]["init_args"],
            "callbacks": config["trainer"]["callbacks"]}


def run_distillation(args: argparse.Namespace) -> dict[str, Any]:
    """One (SFD or SiD, seed): distil, export, evaluate; runs in its own process."""
    config = yaml.safe_load((Path(args.configs) / f"{args.run}.yaml").read_text())
    pl.seed_everything(args.seed, verbose=False)
    init = {**config["model"]["init_args"], "teacher": args.teacher,
            **json.loads(args.distill_overrides)}
    module = SFDModule(**init)
    clock = Clock()
    steps = args.distill_steps or config["trainer"]["max_steps"]
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[clock])
    trainer.fit(module)
    exported = Path(args.out).with_suffix("") / f"{args.run}_seed{args.seed}"
    module.save_pretrained(exported)
    save_grid(str(exported), exported.with_suffix(".png"))
    # SiD forgets nothing: its UA on the same labels is what distillation alone gives.
    scores = evaluate_one_step(str(exported), args.teacher, args.classifiers,
                               args.forget_classes, args.num_per_label)
    return {"method": args.run, "seed": args.seed, "iterations": module.iteration,
            "train_seconds": round(clock.end - clock.first_step, 1), "generator": str(exported),
            "hyperparameters": init, **scores}


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One (method, seed): fit, evaluate, and report; runs in its own process."""
    torch.set_num_threads(args.threads)
    if args.run in DISTILLATIONS:
        return run_distillation(args)
    config = method_config(args.run, Path(args.configs))
    pl.seed_everything(args.seed, verbose=False)
    data_args = {**config["data"], **json.loads(args.data_overrides)}
    data = ForgetSetDataModule(**data_args)
    module_path, name = config["model"]["class_path"].rsplit(".", 1)
    init = {**config["model"]["init_args"], "pretrained": args.pretrained,
            **json.loads(args.model_overrides)}
    module = getattr(importlib.import_module(module_path), name)(**init)
    if args.run == "vdu":
        module.set_prior(ParameterPrior.load(args.prior))
    clock = Clock()
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, max_steps=args.max_steps,
                         logger=False, enable_checkpointing=False, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clock, UnlearningGuard()])
    trainer.fit(module, datamodule=data)
    scores = evaluate(module, data, args.pretrained, args.classifiers, args.num_samples,
                      args.sample_steps)
    if args.export:
        module.save_pretrained(f"{args.export}/{args.run}_seed{args.seed}")
    if args.grids:
        save_before_after(module, args.classifiers[0], data.forget_classes[0],
                          args.sample_steps, f"{args.grids}/{args.run}_seed{args.seed}.png")
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "method": args.run, "seed": args.seed, "class": type(module).__name__,
        "data_constrained": bool(module.data_constrained), "steps": trainer.global_step,
        "prepare_seconds": round(clock.first_step - clock.start, 1),
        "train_seconds": round(clock.end - clock.first_step, 1),
        "peak_memory_mb": round(peak / 2**20, 1),
        "peak_memory_kind": "cuda allocated" if torch.cuda.is_available() else "process RSS",
        "final_terms": {k: float(v) for k, v in module.loss_terms.items()},
        "hyperparameters": init, **scores,
    }


def launch(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--run", method, "--seed", str(seed)]
    for key in ("pretrained", "prior", "configs", "max_steps", "num_samples",
                "sample_steps", "threads", "accelerator", "teacher", "distill_steps",
                "num_per_label", "out", "model_overrides", "data_overrides",
                "distill_overrides", "grids", "export"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    command += ["--forget-classes", *map(str, args.forget_classes)]
    command += ["--classifiers", *args.classifiers]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if method in DISTILLATIONS:
        print(f"{method:16s} seed {seed}: UA {result['one_step']['ua']:5.1f}% (second "
              f"{result['one_step'].get('second_ua', float('nan')):5.1f}%)  consistency "
              f"{result['one_step']['class_consistency']:5.1f}%  u-FID "
              f"{result['one_step']['u_fid']:7.2f}  x{result['speed']['speedup']:.0f} faster  "
              f"{result['train_seconds']:.0f} s", flush=True)
        return result
    print(f"{method:16s} seed {seed}: PUL {result['pul']:6.1f}% (second "
          f"{result.get('second_pul', float('nan')):6.1f}%)  u-FID {result['u_fid']:7.2f} "
          f"(x{result['u_fid_ratio']:.2f})  bpd {result['bpd_forget_increase']:+.3f} / "
          f"{result['bpd_retain_increase']:+.3f}  {result['train_seconds']:.0f} s", flush=True)
    return result


STATISTICS = ("pul", "second_pul", "u_fid", "u_fid_ratio", "second_u_fid_ratio",
              "retained_drift", "bpd_forget_increase", "bpd_retain_increase",
              "bpd_forget_minus_retain",
              "change_forgotten", "change_retained", "change_ratio", "background_shift",
              "train_seconds", "prepare_seconds", "peak_memory_mb")


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        mine = [r for r in results if r["method"] == method]

        def stat(key: str) -> tuple[float, float]:
            # Not statistics.stdev: it fails on NaN (PUL when the original drew no forget class).
            values = torch.tensor([float("nan") if r.get(key) is None else float(r[key])
                                   for r in mine], dtype=torch.float64)
            spread = float(values.std()) if len(values) > 1 else 0.0
            return float(values.mean()), spread
        rows.append({"method": method, "class": mine[0]["class"], "seeds": len(mine),
                     "data_constrained": mine[0]["data_constrained"],
                     **{key: stat(key) for key in STATISTICS}})
    return rows


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    mean, spread = row[key]
    return f"{mean:{spec}} ± {spread:{spec.lstrip('+')}}"


def markdown(rows: list[dict[str, Any]], original_fid: float) -> str:
    """Two tables: what the evaluators read, and what needs no classifier (with the costs)."""
    lines = ["| method | data | PUL % | PUL % (second evaluator) | u-FID | u-FID / original | "
             "u-FID / original (second) | retained drift |", "|---" * 8 + "|"]
    for r in rows:
        data = "D_f only" if r["data_constrained"] else "**needs D_r**"
        lines.append(f"| {r['method']} | {data} | " + " | ".join(
            _cell(r, key, spec) for key, spec in (
                ("pul", ".1f"), ("second_pul", ".1f"), ("u_fid", ".1f"), ("u_fid_ratio", ".2f"),
                ("second_u_fid_ratio", ".2f"), ("retained_drift", ".2f"))) + " |")
    lines.append(f"\nOriginal model's u-FID: {original_fid:.2f}.\n")
    lines += ["| method | bits/dim increase, held-out forget | bits/dim increase, held-out "
              "retain | forget − retain | sample change, forgotten seeds | sample change, "
              "other seeds | change ratio | background shift | train s | before the first "
              "step s | peak MB |", "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(
            _cell(r, key, spec) for key, spec in (
                ("bpd_forget_increase", ".3f"), ("bpd_retain_increase", ".3f"),
                ("bpd_forget_minus_retain", ".3f"),
                ("change_forgotten", ".3f"), ("change_retained", ".3f"),
                ("change_ratio", ".2f"), ("background_shift", "+.3f"),
                ("train_seconds", ".1f"), ("prepare_seconds", ".1f"))) +
            f" | {r['peak_memory_mb'][0]:.0f} |")
    return "\n".join(lines)


def distillation_markdown(results: list[dict[str, Any]]) -> str:
    """One row per (SFD or SiD, seed) and the teacher's DDIM-50 as the reference."""
    speed = results[0]["speed"]
    multi = next(k for k in speed if k.startswith("ddim"))
    lines = ["| sampler | seed | UA % (first / second evaluator) | class consistency % | "
             "u-FID (retained) | images/s | train s |", "|---" * 7 + "|"]

    def both(scores: dict[str, Any], key: str, spec: str) -> str:
        return f"{scores[key]:{spec}} / {scores.get('second_' + key, float('nan')):{spec}}"
    for r in results:
        one = r["one_step"]
        lines.append(f"| {r['method']}, one step | {r['seed']} | {both(one, 'ua', '.1f')} | "
                     f"{both(one, 'class_consistency', '.1f')} | {both(one, 'u_fid', '.2f')} | "
                     f"{r['speed']['one_step_images_per_second']:.0f} | "
                     f"{r['train_seconds']:.0f} |")
    teacher = results[0]["teacher"]
    lines.append(f"| teacher, DDIM-{multi[4:].split('_')[0]} | — | {both(teacher, 'ua', '.1f')} | "
                 f"{both(teacher, 'class_consistency', '.1f')} | "
                 f"{both(teacher, 'u_fid', '.2f')} | {speed[multi]:.1f} | — |")
    return "\n".join(lines)


#: PUL below this is drawn at it (a collapse into the forgotten class gives −600%), with the
#: value written beside it, so that the rest of the plot keeps its scale.
PUL_FLOOR = -100.0


def scatter(results: list[dict[str, Any]], path: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 4.2), layout="constrained")
    axes = figure.subplots()
    for index, method in enumerate(dict.fromkeys(r["method"] for r in results)):
        mine = [r for r in results if r["method"] == method]
        puls = [max(r["pul"], PUL_FLOOR) for r in mine]
        clipped = any(r["pul"] < PUL_FLOOR for r in mine)
        axes.scatter(puls, [r["u_fid"] for r in mine], label=method, color=f"C{index}",
                     marker="<" if clipped else "o" if mine[0]["data_constrained"] else "s",
                     facecolors="none" if not mine[0]["data_constrained"] else f"C{index}")
        if clipped:
            lowest = min(r["pul"] for r in mine)
            axes.annotate(f"PUL {lowest:.0f}%", (PUL_FLOOR, mine[0]["u_fid"]),
                          textcoords="offset points", xytext=(8, 4), fontsize=7)
    axes.axhline(results[0]["u_fid_original"], color="grey", linestyle="--",
                 label="original model")
    axes.set_xlabel("PUL (%, first evaluator)  →  forgets more")
    axes.set_ylabel("u-FID  (lower is better)")
    axes.set_yscale("log")
    axes.legend(fontsize=8, title="hollow squares need D_r", title_fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(PEERS),
                        help=f"default: the peers; {', '.join(DISTILLATIONS)} on request")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--pretrained", default="runs/mnist5k/ddpm")
    parser.add_argument("--classifiers", nargs="+",
                        default=["runs/mnist5k/classifier", "runs/mnist5k/classifier_lenet"],
                        help="the evaluators; the first is the primary one")
    parser.add_argument("--prior", default="runs/mnist5k/prior_trajectory.safetensors")
    parser.add_argument("--configs", default=str(REPO / "configs" / "mnist5k"))
    parser.add_argument("--max-steps", type=int, default=120, help="as configs/mnist5k")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--workers", type=int, default=1, help="runs at once")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--model-overrides", default="{}", help="JSON, for every peer")
    parser.add_argument("--data-overrides", default="{}", help="JSON, for every peer")
    parser.add_argument("--teacher", default="runs/mnist5k/ddpm_conditional",
                        help="the label-conditional model SFD and SiD distil")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="SFD/SiD trainer steps (two per iteration); 0: their configs'")
    parser.add_argument("--num-per-label", type=int, default=100,
                        help="one-step and DDIM-50 samples per label")
    parser.add_argument("--distill-overrides", default="{}", help="JSON, for SFD and SiD")
    parser.add_argument("--forget-classes", nargs="+", type=int, default=[1],
                        help="the labels UA is measured on, for SFD and SiD (as sfd.yaml)")
    parser.add_argument("--out", default="runs/bench/unlearning.json")
    parser.add_argument("--grids", default="",
                        help="a folder for each peer run's captioned before/after grid (PNG)")
    parser.add_argument("--plot", default=None, help="the PUL-versus-u-FID scatter (PNG)")
    parser.add_argument("--export", default="",
                        help="a folder for each peer run's unlearned model (diffusers)")
    parser.add_argument("--run", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args)))
        return

    start = time.perf_counter()
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    # The first seed of each method fills the caches the others read (the original's
    # samples, EWC's Fisher file): the very first run goes alone, then the rest of the
    # first seed, then the other seeds.
    first_seed = [job for job in jobs if job[1] == args.seeds[0]]
    results = [launch(args, *jobs[0])]
    with ThreadPoolExecutor(args.workers) as pool:
        for batch in (first_seed[1:], jobs[len(first_seed):]):
            results += list(pool.map(lambda job: launch(args, *job), batch))
    peers = [r for r in results if r["method"] in PEERS]
    rows = summarise(peers) if peers else []
    tables = [markdown(rows, peers[0]["u_fid_original"])] if peers else []
    distilled = [r for r in results if r["method"] in DISTILLATIONS]
    tables += [distillation_markdown(distilled)] if distilled else []
    table = "\n\n".join(tables)
    print(table)
    report = {"args": vars(args), "wall_seconds": round(time.perf_counter() - start, 1),
              "runs": results, "summary": rows, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2))
    if args.plot and peers:
        scatter(peers, args.plot)


if __name__ == "__main__":
    main()
