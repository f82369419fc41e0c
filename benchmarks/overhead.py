"""What VDU costs beyond plain denoising: the stability term, the prior, and EWC's Fisher.

Three measurements in one process, so that their ratios share the machine's load:

(a) one VDU training step (``VDUModule.objective`` → backward → Adam step, with a
    ``ParameterPrior`` over every parameter) against a plain denoising step on the same batch
    (the same step with the denoising loss alone); steps alternate A B A B … after a warm-up,
    and the ratio of the medians is reported (docs/method.md §2 wants it ≤ 1.05), with the
    stability term alone (forward + backward) as a fraction of a VDU step;
(b) ``ParameterPrior.from_checkpoints(paths, "trajectory")`` from K safetensors state dicts
    of the UNet (random perturbations of it): the time and the peak RSS increase of each
    build, each in a fresh process forked from a server that has only imported the code (the
    build's peak is what the kernel's peak-RSS mark shows, reset just before the build), and
    peak(largest K) / peak(smallest K), which the streaming build keeps near 1 (docs/method.md §3);
(c) ``vdu_lightning.methods.peers.fisher.diagonal_fisher`` (EWC / Selective Amnesia,
    docs/method.md §7) on N
    images and its timesteps, against the time of building the prior of the largest K.

The UNet is the mnist5k one (configs/mnist5k/pretrain.yaml, 1.1 M parameters, 16×16), randomly
initialised: only costs are measured. Results go to stdout (markdown tables) and to a JSON file.

    python benchmarks/overhead.py --threads 1 --out runs/bench/overhead.json   # mnist5k UNet
    python benchmarks/overhead.py --tiny --out /tmp/overhead_tiny.json         # smoke run, ~30 s

Run it alone on the machine: other jobs inflate the step times (the ratios less so). Options:
``--repeats`` (timed A B pairs), ``--batch-size``, ``--ks`` (the K of (b)),
``--fisher-samples``, ``--fisher-timesteps`` (per image; 1000 = all T), ``--threads``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import multiprocessing
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from vdu_lightning import ParameterPrior, VDUModule
from vdu_lightning.config_files import tiny_unet
from vdu_lightning.diffusion import (
    build_scheduler,
    build_unet,
    load_pretrained,
    sample_shape,
    save_pretrained,
)
from vdu_lightning.files import atomic_write_text
from vdu_lightning.methods.peers.fisher import diagonal_fisher

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = REPO / "configs" / "mnist5k" / "pretrain.yaml"
#: The tests' tiny UNet (configs/tests/tiny_pretrain.yaml) at half its width, as this smoke run
#: has always timed it: its numbers stay comparable with earlier runs.
TINY_UNET = tiny_unet(REPO / "configs") | {"block_out_channels": [8, 16], "norm_num_groups": 4}
#: The largest acceptable VDU step / denoising step (docs/method.md §2: S must stay cheap).
TARGET_RATIO = 1.05
#: Per mode: timed pairs, warm-up pairs, the K of (b), Fisher images and timesteps per image.
DEFAULTS = {
    "full": {"repeats": 50, "warmup": 5, "ks": [2, 4, 8, 16], "fisher_samples": 64,
             "fisher_timesteps": 1000, "threads": 0},
    "tiny": {"repeats": 5, "warmup": 2, "ks": [2, 4], "fisher_samples": 4,
             "fisher_timesteps": 10, "threads": 1},
}
#: The standard deviation of the checkpoints around the initial weights.
SPREAD = 1e-3
#: What the processes of (b) import before forking (this script's imports).
PRELOAD = ["torch", "yaml", "safetensors.torch", "vdu_lightning",
           "vdu_lightning.methods.peers.fisher"]


# ---- the model and its checkpoints -------------------------------------------------------------
def model_config(tiny: bool) -> tuple[dict[str, Any], int]:
    """The UNet's keyword arguments and the number of diffusion timesteps T."""
    if tiny:
        return dict(TINY_UNET), 1000
    init_args = yaml.safe_load(PRETRAIN_CONFIG.read_text())["model"]["init_args"]
    return dict(init_args["unet"]), int(init_args.get("num_train_timesteps", 1000))


def write_models(workdir: Path, config: dict[str, Any], num_timesteps: int, k: int
                 ) -> tuple[Path, list[Path]]:
    """A diffusers directory of a seeded UNet and ``k`` perturbed state dicts of it."""
    torch.manual_seed(0)
    unet = build_unet(config)
    save_pretrained(unet, build_scheduler(num_timesteps), workdir / "ddpm")
    generator = torch.Generator().manual_seed(1)
    paths = []
    for index in range(k):
        snapshot = {name: (t + SPREAD * torch.randn(t.shape, generator=generator)
                           if torch.is_floating_point(t) else t).contiguous()
                    for name, t in unet.state_dict().items()}
        paths.append(workdir / f"snapshot_{index:02d}.safetensors")
        save_file(snapshot, str(paths[-1]))
    return workdir / "ddpm", paths


def quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return [q1, q3]


# ---- (a) a VDU step against a denoising step ---------------------------------------------------
def time_steps(pretrained: Path, prior: ParameterPrior, batch_size: int, repeats: int,
               warmup: int) -> dict[str, Any]:
    module = VDUModule(str(pretrained), gamma=0.9)
    module.set_prior(prior)
    optimizer = module.configure_optimizers()
    generator = torch.Generator().manual_seed(2)
    batch = {"image": torch.rand((batch_size, *module.sample_shape), generator=generator) * 2 - 1}
    torch.manual_seed(3)  # t and ε of the steps come from torch's default generator

    def vdu_step() -> None:
        module.objective(batch)["loss"].backward()
        optimizer.step()

    def denoising_step() -> None:
        module.denoising_loss(batch).backward()
        optimizer.step()

    def stability_only() -> None:
        module.stability_loss().backward()

    kinds: dict[str, Callable[[], None]] = {
        "vdu_step": vdu_step, "denoising_step": denoising_step, "stability": stability_only}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for round_index in range(warmup + repeats):
        for name, step in kinds.items():  # interleaved: A B C A B C …
            optimizer.zero_grad(set_to_none=True)  # as Lightning does before each step
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    optimizer.zero_grad(set_to_none=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["vdu_step"] / medians["denoising_step"]
    return {
        "batch_size": batch_size, "image_shape": list(module.sample_shape),
        "parameters": sum(p.numel() for p in module.unet.parameters()),
        "prior_parameters": prior.numel, "repeats": repeats, "warmup": warmup,
        **{f"{name}_s": value for name, value in medians.items()},
        **{f"{name}_quartiles_s": quartiles(values) for name, values in times.items()},
        "ratio": ratio,
        "stability_fraction": medians["stability"] / medians["vdu_step"],
        "target_ratio": TARGET_RATIO, "meets_target": ratio <= TARGET_RATIO,
    }


# ---- (b) building the prior from K checkpoints ---------------------------------------------------
def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process to its current RSS (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _maxrss_mb() -> float:
    scale = 1024 * 1024 if platform.system() == "Darwin" else 1024  # bytes on macOS, else KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def build_prior_measured(paths: list[str], threads: int) -> dict[str, Any]:
    """In a fresh process: time one prior build and the peak RSS increase it causes."""
    if threads:
        torch.set_num_threads(threads)
    torch.ones(8, dtype=torch.float64).add_(1)  # torch's one-off setup stays out of the measure
    gc.collect()
    exact = _reset_peak_rss()
    before = _status_mb("VmRSS") if exact else _maxrss_mb()
    start = time.perf_counter()
    prior = ParameterPrior.from_checkpoints(paths, "trajectory")
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM") if exact else _maxrss_mb()
    return {
        "k": len(paths), "build_s": seconds, "peak_mb": peak - before, "rss_before_mb": before,
        "prior_mb": 2 * prior.numel * 4 / 2**20,
        "checkpoint_mb": sum(Path(p).stat().st_size for p in paths) / len(paths) / 2**20,
        "memory_method": "VmHWM after - VmRSS before, peak mark reset before the build" if exact
        else "ru_maxrss after - ru_maxrss before (an earlier, higher peak would hide the build's)",
    }


def time_priors(paths: list[Path], ks: list[int], threads: int) -> dict[str, Any]:
    # Each build in its own process, forked from a server that has imported this script's
    # modules and done nothing else: no heap left over from an earlier build can hide a later
    # build's peak, and the imports (~10 s) are paid once, not once per K.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(PRELOAD)
    per_k = {}
    for k in ks:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            per_k[str(k)] = pool.submit(
                build_prior_measured, [str(p) for p in paths[:k]], threads).result()
    low, high = per_k[str(min(ks))]["peak_mb"], per_k[str(max(ks))]["peak_mb"]
    return {
        "checkpoint_format": "safetensors state dict of the UNet", "source": "trajectory",
        "start_method": context.get_start_method(), "per_k": per_k,
        "peak_ratio": high / low if low > 0 else None, "peak_ratio_ks": [max(ks), min(ks)],
        "build_time_ratio": per_k[str(max(ks))]["build_s"] / per_k[str(min(ks))]["build_s"],
    }


# ---- (c) the EWC Fisher ------------------------------------------------------------------------
def time_fisher(pretrained: Path, samples: int, timesteps: int, batch_size: int
                ) -> dict[str, Any]:
    unet, scheduler = load_pretrained(pretrained)
    generator = torch.Generator().manual_seed(4)
    # Only the cost is measured: seeded uniform images in [-1, 1] stand in for samples.
    images = torch.rand((samples, *sample_shape(unet)), generator=generator) * 2 - 1
    torch.manual_seed(5)
    diagonal_fisher(unet, scheduler, images[:1], num_timesteps=1, batch_size=batch_size)
    start = time.perf_counter()
    fisher = diagonal_fisher(unet, scheduler, images, num_timesteps=timesteps,
                             batch_size=batch_size)
    seconds = time.perf_counter() - start
    if not all(torch.isfinite(f).all() for f in fisher.values()):
        raise RuntimeError("the Fisher estimate holds NaN or inf")
    used = min(timesteps, scheduler.config.num_train_timesteps)
    return {
        "samples": samples, "timesteps_per_sample": used,
        "num_train_timesteps": scheduler.config.num_train_timesteps, "batch_size": batch_size,
        "fisher_s": seconds, "per_sample_s": seconds / samples,
        "unet_passes": samples * used,
    }


# ---- the report ----------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    step, prior, fisher = result["step"], result["prior"], result["fisher"]
    ms = 1000.0
    lines = [
        f"UNet: {result['unet']['parameters']:,} parameters, "
        f"{step['batch_size']}×{'×'.join(map(str, step['image_shape']))} batch, "
        f"{result['threads']} threads; medians of {step['repeats']} interleaved steps",
        "",
        "| step | median | quartiles |",
        "|---|---|---|",
    ]
    for name, label in (("vdu_step", "VDU step (γ·S + (1−γ)·P, backward, Adam)"),
                        ("denoising_step", "denoising step (P alone, backward, Adam)"),
                        ("stability", "stability term alone (forward + backward)")):
        q1, q3 = step[f"{name}_quartiles_s"]
        lines.append(f"| {label} | {step[f'{name}_s'] * ms:.2f} ms | "
                     f"{q1 * ms:.2f}–{q3 * ms:.2f} ms |")
    lines += [
        f"| **VDU / denoising** | **{step['ratio']:.3f}** (target ≤ {TARGET_RATIO}: "
        f"{'met' if step['meets_target'] else 'missed'}) | |",
        f"| stability / VDU step | {100 * step['stability_fraction']:.1f}% | |",
        "",
        "| K | build | peak RSS increase | checkpoint |",
        "|---|---|---|---|",
    ]
    for k, entry in prior["per_k"].items():
        lines.append(f"| {k} | {entry['build_s']:.2f} s | {entry['peak_mb']:.1f} MiB | "
                     f"{entry['checkpoint_mb']:.1f} MiB |")
    high, low = prior["peak_ratio_ks"]
    ratio = "n/a" if prior["peak_ratio"] is None else f"{prior['peak_ratio']:.2f}"
    lines += [
        f"\npeak(K={high}) / peak(K={low}) = {ratio}",
        "",
        "| Fisher (EWC) | time | vs prior build |",
        "|---|---|---|",
        f"| {fisher['samples']} images × {fisher['timesteps_per_sample']} timesteps | "
        f"{fisher['fisher_s']:.2f} s ({fisher['per_sample_s']:.3f} s per image) | "
        f"{fisher['vs_prior']:.1f}× the K={fisher['prior_k']} prior |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny UNet, few repeats, K = 2, 4: a smoke run of ~30 s")
    parser.add_argument("--repeats", type=int, help="timed steps of each kind (50; tiny 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps of each kind first (5; tiny 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ks", type=int, nargs="+", help="the K of (b) (2 4 8 16; tiny 2 4)")
    parser.add_argument("--fisher-samples", type=int, help="images of the Fisher (64; tiny 4)")
    parser.add_argument("--fisher-timesteps", type=int,
                        help="timesteps per image (1000 = all T; tiny 10)")
    parser.add_argument("--fisher-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's own; tiny 1)")
    parser.add_argument("--out", help="JSON results (runs/bench/overhead[_tiny].json)")
    args = parser.parse_args()
    mode = "tiny" if args.tiny else "full"
    for name, value in DEFAULTS[mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or args.warmup < 0 or min(args.ks) < 2 or args.fisher_samples < 1:
        parser.error("need --repeats ≥ 1, --warmup ≥ 0, every K ≥ 2 and --fisher-samples ≥ 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or f"runs/bench/overhead{'_tiny' if args.tiny else ''}.json"

    config, num_timesteps = model_config(args.tiny)
    ks = sorted(set(args.ks))
    with tempfile.TemporaryDirectory(prefix="vdu_overhead_") as tmp:
        pretrained, paths = write_models(Path(tmp), config, num_timesteps, max(ks))
        step = time_steps(pretrained, ParameterPrior.from_checkpoints(paths[:4], "trajectory"),
                          args.batch_size, args.repeats, args.warmup)
        prior = time_priors(paths, ks, args.threads)
        fisher = time_fisher(pretrained, args.fisher_samples, args.fisher_timesteps,
                             args.fisher_batch_size)
    largest = prior["per_k"][str(max(ks))]
    fisher.update(prior_k=max(ks), prior_build_s=largest["build_s"],
                  vs_prior=fisher["fisher_s"] / largest["build_s"])

    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "mode": mode, "threads": torch.get_num_threads(),
        "unet": {"config": config, "num_train_timesteps": num_timesteps,
                 "parameters": step["parameters"]},
        "step": step, "prior": prior, "fisher": fisher,
    }
    atomic_write_text(out, json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
