"""Callbacks that make the checkpoint prior (docs/method.md §3).

* ``PriorSnapshot`` collects it while ``DiffusionModule`` trains (``trajectory``), or from K
  short continuations of a pre-trained model in one run (``finetune``).
* ``CheckpointPrior`` builds or loads it when an unlearning run starts and hands it to the
  module (``set_prior``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from vdu_lightning.checkpoints import WEIGHT_PREFIXES
from vdu_lightning.files import check_file_writable
from vdu_lightning.losses import check_choice
from vdu_lightning.modules.compat import check_precision
from vdu_lightning.prior import (
    CHECKPOINT_SOURCES,
    DEFAULT_MIN_VAR,
    ParameterPrior,
    RunningMoments,
    check_min_var,
    select_names,
)


class PriorSnapshot(pl.Callback):
    """Fold the weights of a training ``DiffusionModule`` into a running prior every N steps.

    Snapshots are taken at steps ``start_step + every_n_steps·k`` (k ≥ 1) and folded into
    streaming moments (O(parameters) memory, on the CPU in float64); the prior file is
    written atomically when fit ends (global rank 0). The moments are part of the callback's
    checkpoint state, so a resumed run continues the same prior.

    ``source="trajectory"``: snapshots along one training run (SWA-Gaussian-style diagonal),
    usually of the EMA weights. ``source="finetune"``: after each snapshot the weights (raw
    and EMA) go back to those the run started from and the optimizer state is cleared, so
    the K snapshots are K independent short continuations of a pre-trained model, each with
    its own data order and noise; take the ``raw`` weights, as an EMA barely leaves the start
    in a short continuation.

    Args:
        path: the prior file to write (safetensors).
        every_n_steps: optimizer steps between snapshots.
        start_step: the step after which snapshots start (e.g. half-way through training).
        weights: ``ema`` (the module's ``ema_unet``) or ``raw`` (its ``unet``).
        source: ``trajectory`` or ``finetune``.
        include: shell-style patterns of parameter names to cover (None: all).
        min_var: the variance floor (see ``ParameterPrior``).

    Example (YAML, in a pre-training config)::

        trainer:
          callbacks:
            - class_path: vdu_lightning.callbacks.PriorSnapshot
              init_args: {path: runs/mnist5k/prior_trajectory.safetensors,
                          every_n_steps: 100, start_step: 1300}
    """

    def __init__(
        self,
        path: str,
        every_n_steps: int = 100,
        start_step: int = 0,
        weights: str = "ema",
        source: str = "trajectory",
        include: Sequence[str] | None = None,
        min_var: float = DEFAULT_MIN_VAR,
    ) -> None:
        if every_n_steps < 1 or start_step < 0:
            raise ValueError(f"every_n_steps must be >= 1 and start_step >= 0, got "
                             f"{every_n_steps} and {start_step}")
        check_choice("weights", weights, list(WEIGHT_PREFIXES))
        check_choice("source", source, ["trajectory", "finetune"])
        self.min_var = check_min_var(min_var, "PriorSnapshot min_var")
        self.path, self.every_n_steps, self.start_step = path, every_n_steps, start_step
        self.weights, self.source = weights, source
        self.include = list(include) if include is not None else None
        self.moments = RunningMoments()
        self._last_step = -1
        self._start_weights: dict[str, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        return f"PriorSnapshot[{self.path}]"

    def _network(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        return pl_module.ema_unet if self.weights == "ema" else pl_module.unet

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # The raw weights need only `unet` (e.g. TextToImageFinetuneModule); EMA ones the
        # `ema_unet` of a DiffusionModule.
        needed = ("unet", "ema_unet") if self.weights == "ema" else ("unet",)
        for attribute in needed:
            if not isinstance(getattr(pl_module, attribute, None), torch.nn.Module):
                raise TypeError(f"PriorSnapshot(weights={self.weights!r}) needs a module with "
                                f"{' and '.join(map(repr, needed))}; "
                                f"{type(pl_module).__name__} has no {attribute}")
        names = select_names(dict(self._network(pl_module).named_parameters()), self.include)
        if not names:
            raise ValueError(f"PriorSnapshot: no parameter matches include={self.include}")
        # The file is written when fit ends: a directory there would only be found then.
        check_file_writable(self.path, "PriorSnapshot path")
        if trainer.max_steps > 0:
            expected = max(0, (trainer.max_steps - self.start_step) // self.every_n_steps)
            if expected < 2:
                raise ValueError(
                    f"PriorSnapshot would take {expected} snapshots (max_steps="
                    f"{trainer.max_steps}, start_step={self.start_step}, every_n_steps="
                    f"{self.every_n_steps}); a prior needs at least 2"
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.source == "finetune" and self._start_weights is None:
            # Only what trains can leave the start (for a text-to-image model a small part of
            # a large UNet, kept in host memory and in every checkpoint).
            self._start_weights = {n: p.detach().cpu().clone()
                                   for n, p in pl_module.unet.named_parameters()
                                   if p.requires_grad}

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if (step == self._last_step or step <= self.start_step
                or (step - self.start_step) % self.every_n_steps):
            return
        self._last_step = step
        parameters = dict(self._network(pl_module).named_parameters())
        names = select_names(parameters, self.include)
        self.moments.update({n: parameters[n] for n in names}, f"the snapshot at step {step}")
        if self.source == "finetune":
            self._restart(trainer, pl_module)

    @torch.no_grad()
    def _restart(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Back to the start weights with a fresh optimizer: the next continuation."""
        pl_module.unet.load_state_dict(self._start_weights, strict=False)
        if isinstance(getattr(pl_module, "ema_unet", None), torch.nn.Module):
            pl_module.ema_unet.load_state_dict(self._start_weights, strict=False)
        for optimizer in trainer.optimizers:
            optimizer.state.clear()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.moments.count < 2:
            rank_zero_warn(f"PriorSnapshot took {self.moments.count} snapshot(s); a prior "
                           f"needs 2: {self.path} was not written")
            return
        prior = self.moments.to_prior(self.source, self.min_var)
        prior.save(self.path)
        rank_zero_info(f"wrote {self.path}: {prior.describe()}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "moments": self.moments.state_dict(),
                "start_weights": self._start_weights}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]
        self.moments.load_state_dict(state_dict["moments"])
        self._start_weights = state_dict["start_weights"]


#: Where the prior is centred: its checkpoints' mean, or the weights the run starts from.
PRIOR_CENTRES = ("checkpoints", "model")


class CheckpointPrior(pl.Callback):
    """Give an unlearning module its prior when fit starts: built from K checkpoints, or
    loaded from a prior file.

    Runs in ``setup("fit")``, on the CPU model, before any training. Checkpoints are read one
    at a time with ``weights_only=True`` (never all in memory). Every process builds the same
    prior from the same files (no broadcast of large objects).

    Resuming: the prior is part of every VDU checkpoint and is restored from it. Lightning
    only reads ``fit(ckpt_path=...)`` after ``setup``, so this callback learns of a resume
    from ``trainer.ckpt_path`` set before fit, or from ``resuming = True``, which ``vdu fit
    --ckpt_path ...`` sets; it then does nothing (the files may even be gone). Otherwise it
    builds the prior and the checkpoint's prior replaces it.

    Args:
        checkpoints: K ``DiffusionModule`` checkpoints, diffusers directories or UNet state
            dicts (give this or ``prior``).
        prior: a prior file written by ``PriorSnapshot``, ``vdu prior`` or
            ``ParameterPrior.save``.
        source: ``independent``, ``trajectory`` or ``finetune`` (checkpoints only).
        include: shell-style patterns of parameter names to cover (from checkpoints, or
            kept of a prior file): what VDU moves.
        min_var: the variance floor (checkpoints only).
        weights: ``ema`` or ``raw`` weights of ``DiffusionModule`` checkpoints.
        save_to: also write the built prior here (global rank 0), to reuse it.
        centre: ``checkpoints`` (the prior's own mean) or ``model``: the same variances
            around the weights the run starts from (``ParameterPrior.recentred``), to forget
            again from an already unlearned model without pulling it back to the original.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: vdu_lightning.callbacks.CheckpointPrior
              init_args: {prior: runs/mnist5k/prior_trajectory.safetensors}
    """

    def __init__(
        self,
        checkpoints: Sequence[str] | None = None,
        prior: str | None = None,
        source: str = "trajectory",
        include: Sequence[str] | None = None,
        min_var: float = DEFAULT_MIN_VAR,
        weights: str = "ema",
        save_to: str | None = None,
        centre: str = "checkpoints",
    ) -> None:
        if (checkpoints is None) == (prior is None):
            raise ValueError("CheckpointPrior needs exactly one of `checkpoints` (K files or "
                             "directories) or `prior` (a prior file)")
        check_choice("source", source, CHECKPOINT_SOURCES)
        check_choice("weights", weights, list(WEIGHT_PREFIXES))
        check_min_var(min_var, "CheckpointPrior min_var")
        check_choice("centre", centre, PRIOR_CENTRES)
        self.checkpoints = list(checkpoints) if checkpoints is not None else None
        self.prior_path = prior
        self.source, self.include, self.min_var = source, include, min_var
        self.weights, self.save_to, self.centre = weights, save_to, centre
        self.resuming = False

    def build(self) -> ParameterPrior:
        """The prior this callback hands over (read or built on every call)."""
        if self.prior_path is not None:
            prior = ParameterPrior.load(self.prior_path)
            return prior if self.include is None else prior.restricted(self.include)
        return ParameterPrior.from_checkpoints(self.checkpoints, self.source, self.include,
                                               self.min_var, self.weights)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.resuming or trainer.ckpt_path is not None:
            return
        if not callable(getattr(pl_module, "set_prior", None)):
            raise TypeError(f"CheckpointPrior needs a module with set_prior() (a VDUModule); "
                            f"{type(pl_module).__name__} has none")
        # Before the (possibly long) build: the module would refuse it in its own setup.
        check_precision(trainer, type(pl_module).__name__)
        if self.save_to is not None:
            check_file_writable(self.save_to, "CheckpointPrior save_to")
        prior = self.build()
        if self.centre == "model":
            prior = prior.recentred(dict(pl_module.unet.named_parameters()))
        pl_module.set_prior(prior)
        rank_zero_info(prior.describe())
        if self.save_to is not None and trainer.is_global_zero:
            prior.save(self.save_to)
