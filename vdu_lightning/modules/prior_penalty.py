"""``PriorPenaltyModule``: the unlearning methods whose stability term is a quadratic pull
towards a diagonal-Gaussian prior over the weights (docs/method.md §2, §3, §7).

VDU (the checkpoint prior), the isotropic anchor (one variance) and EWC (the Fisher as a
precision) share it: the prior, which weights it lets move, its quadratic under DDP and
FSDP2, and its journey through checkpoints. A subclass says how it scales the quadratic
(``stability_loss``) and what it minimises (``objective``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from vdu_lightning import fsdp
from vdu_lightning.losses import stability_penalty
from vdu_lightning.modules.unlearning import UnlearningModule
from vdu_lightning.prior import ParameterPrior

__all__ = ["PRIOR_KEY", "PriorPenaltyModule", "prior_in_checkpoint"]

#: The checkpoint key holding the prior: it travels with the run, outside the module's
#: buffers (DDP would re-send buffers before every forward pass).
PRIOR_KEY = "vdu_prior"


def prior_in_checkpoint(checkpoint: Mapping[str, Any], path: Any) -> ParameterPrior | None:
    """The prior a checkpoint holds (None if it holds none); a damaged one is refused
    naming the checkpoint ``path``, where the user can find it."""
    if PRIOR_KEY not in checkpoint:
        return None
    try:
        return ParameterPrior.from_state_dict(checkpoint[PRIOR_KEY])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the checkpoint {path} holds a prior (key '{PRIOR_KEY}') that cannot "
                         f"be used: {err}") from err


class PriorPenaltyModule(UnlearningModule):
    """Base of the methods held near the pre-trained weights by a prior N(μ, diag σ²).

    The prior is given by ``set_prior`` (the ``CheckpointPrior`` callback calls it) or made
    by the subclass at the start of fit; only the parameters it covers move. The quadratic
    Σ (θ − μ)² / (2σ²) (``prior_quadratic``) is computed in fp32 in one fused pass, on each
    rank's own shard under FSDP2 (the network is sharded in ``configure_model``).

    Args: those of ``UnlearningModule``.
    """

    def __init__(self, pretrained: str, **kwargs: Any) -> None:
        super().__init__(pretrained, **kwargs)
        self.prior: ParameterPrior | None = None
        self._prior_cache: tuple[Any, ...] | None = None
        self._parameter_cache: tuple[Any, ...] | None = None

    # ---- what a subclass defines ----------------------------------------------------------
    @abstractmethod
    def stability_loss(self) -> torch.Tensor:
        """The stability term: ``prior_quadratic()``, scaled as the method says."""

    # ---- the parameters the prior holds -----------------------------------------------------
    @override
    def unlearning_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """What moves: the parameters the prior covers (all, before a prior is set)."""
        for name, parameter in self.unet.named_parameters():
            if self.prior is None or name in self.prior.mean:
                yield name, parameter

    def set_prior(self, prior: ParameterPrior) -> None:
        """Use ``prior`` (refused if it does not match the network); what
        ``unlearning_parameters()`` then leaves out (by default, what the prior does not
        cover) is frozen."""
        prior.check_matches(self.unet.named_parameters(), "the model being unlearned")
        self.prior = prior
        self._prior_cache = self._parameter_cache = None
        self.freeze_fixed_parameters()

    def prior_quadratic(self) -> torch.Tensor:
        """Σ (θ − μ)² / (2σ²) summed over every entry the prior covers (all ranks' shards)."""
        params, means, inv_stds = self._prior_tensors()
        return self.sum_over_shards(stability_penalty(params, means, inv_stds, "sum"))

    def _prior_tensors(self) -> tuple[list[torch.Tensor], ...]:
        """Parameters, μ and 1/σ aligned, on the parameters' device (cached).

        Under FSDP2 (``ModelParallelStrategy``) the parameters are DTensor shards: this rank's
        local shards come back, with the same slices of μ and 1/σ.
        """
        if self.prior is None:
            raise RuntimeError(f"{type(self).__name__} has no prior: add the CheckpointPrior "
                               "callback or call set_prior() before fit")
        # The parameters are looked up again whenever the network's first one is another
        # object: ``fully_shard`` replaces them all (on the same device), FSDP1 sets views of
        # its flat parameter in each forward; a device move keeps the objects.
        first = next(self.unet.parameters())
        if self._parameter_cache is None or self._parameter_cache[0] is not first:
            named = dict(self.unet.named_parameters())
            params = [named.get(n) for n in self.prior.names]
            layout = fsdp.shard_layout(params, {n: self.prior.mean[n] for n in self.prior.names})
            self._parameter_cache = (first, params, layout)
        _, params, layout = self._parameter_cache
        device = params[0].device
        if self._prior_cache is None or self._prior_cache[0] != (device, layout):
            if layout is None:
                prior = self.prior.to(device)
                means = [prior.mean[n] for n in prior.names]
                inv_stds = [prior.var[n].rsqrt() for n in prior.names]
            else:
                means = [fsdp.local_slice(self.prior.mean[n], layout) for n in self.prior.names]
                inv_stds = [fsdp.local_slice(self.prior.var[n], layout).rsqrt()
                            for n in self.prior.names]
            self._prior_cache = ((device, layout), means, inv_stds)
        if layout is not None:
            params = [p.to_local() for p in params]
        return params, *self._prior_cache[1:]

    def sum_over_shards(self, local: torch.Tensor) -> torch.Tensor:
        """A sum over the prior's entries from this rank's part of it (see
        ``fsdp.sum_over_shards``). Call it after ``_prior_tensors()``, whose layout it uses."""
        layout = self._parameter_cache[2] if self._parameter_cache is not None else None
        return fsdp.sum_over_shards(local, layout)

    # ---- Lightning hooks ------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        """Shard the network with FSDP2 under ``ModelParallelStrategy`` (which requires this
        hook); other strategies pass no mesh: nothing to do."""
        if self.device_mesh is not None:
            fsdp.shard_unet(self.unet, self.device_mesh, type(self).__name__)

    @override
    def on_fit_start(self) -> None:
        if self.prior is None:
            raise RuntimeError(f"{type(self).__name__} has no prior: add the CheckpointPrior "
                               "callback (trainer.callbacks) or call set_prior() before fit")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.prior is not None:
            checkpoint[PRIOR_KEY] = self.prior.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        path = self._trainer.ckpt_path if self._trainer is not None else "being loaded"
        prior = prior_in_checkpoint(checkpoint, path)
        if prior is not None:
            self.set_prior(prior)
