"""Helpers of the cost benchmarks: one measurement per fresh process, and the machine's name.

A process's peak memory (RSS, or the GPU allocator's peak) is only that configuration's own
if nothing else ran in the process before it.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from vdu_lightning.files import atomic_write_text


def run_child(command: list[str], **labels: Any) -> dict[str, Any]:
    """Run ``python <command>`` and return the JSON its last stdout line holds; on a failure
    (e.g. out of memory), ``labels`` with the last line of its stderr as ``error``."""
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True)
    if done.returncode != 0:
        return {**labels, "error": (done.stderr.strip().splitlines() or ["killed"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_name(device: str) -> str:
    """The GPU's name, or the CPU's with the torch threads used."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def save_rows(path: str | None, machine: str, rows: list[dict[str, Any]]) -> None:
    """The measurements as JSON at ``path`` (nothing if None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"machine": machine, "rows": rows}, indent=1))
