"""Per-rank random generators for diffusion noise and timesteps.

Every DDP rank is seeded identically by ``seed_everything`` (model weights must agree), so
noise drawn from the global RNG would be the same on every rank and the ranks would train on
duplicated noise. Noise and timesteps come from a generator seeded with ``seed + rank``.
"""

from __future__ import annotations

import os

import torch

#: A large odd stride keeps the per-rank seeds of nearby base seeds apart.
_RANK_STRIDE = 1_000_003


def base_seed() -> int:
    """The seed ``seed_everything`` set for this job (0 when it was never called)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def rank_generator(device: torch.device | str, rank: int, offset: int = 0) -> torch.Generator:
    """A generator on ``device`` seeded from the job's seed, this process's global rank and an
    ``offset`` (e.g. the step at which a stream has to be started anew)."""
    seed = base_seed() + _RANK_STRIDE * rank + (offset << 32)
    return torch.Generator(device=device).manual_seed(seed)
