"""``VDUModule``: Variational Diffusion Unlearning (method.md §2) as a LightningModule."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

from vdu_lightning.diffusion import predict_noise
from vdu_lightning.losses import check_choice, hinged_error, per_example_error, stability_penalty
from vdu_lightning.modules.unlearning import OPTIMIZERS, UnlearningModule
from vdu_lightning.prior import ParameterPrior

__all__ = ["OPTIMIZERS", "PLASTICITY_RESIDUALS", "PRECONDITIONERS", "PRIOR_KEY", "VDUModule",
           "prior_in_checkpoint"]

#: How the plasticity term measures the forget-set error: ``plain`` as in the method,
#: ``centred`` with each image's mean residual removed (a global shift scores nothing).
PLASTICITY_RESIDUALS = ("plain", "centred")
#: What scales the gradients before the step: nothing, or the prior's variance σ*².
PRECONDITIONERS = ("none", "prior")

#: The checkpoint key holding the prior: it travels with the run, outside the module's
#: buffers (DDP would re-send buffers before every forward pass).
PRIOR_KEY = "vdu_prior"


def prior_in_checkpoint(checkpoint: Mapping[str, Any], path: Any) -> ParameterPrior | None:
    """The prior a VDU checkpoint holds (None if it holds none); a damaged one is refused
    naming the checkpoint ``path``, where the user can find it."""
    if PRIOR_KEY not in checkpoint:
        return None
    try:
        return ParameterPrior.from_state_dict(checkpoint[PRIOR_KEY])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the checkpoint {path} holds a prior (key '{PRIOR_KEY}') that cannot "
                         f"be used: {err}") from err


class VDUModule(UnlearningModule):
    """Unlearn a forget set from a pre-trained DDPM: L = γ·S(θ) + (1 − γ)·P(θ).

    S is the stability regularizer, the quadratic of the checkpoint prior N(μ*, diag σ*²)
    (given by the ``CheckpointPrior`` callback or ``set_prior``); P, the plasticity inducer,
    is minus the C_t-weighted denoising error on the forget set, so minimising L raises that
    error while S holds the weights near the pre-trained ones. θ starts at the pre-trained
    weights; only the parameters the prior covers move.

    **Reduction** (``reduction``). ``mean`` (default) divides S by the number of parameters
    the prior covers and takes P as the mean over the batch and pixels; both terms are then
    averages of per-entry quantities whose size does not depend on the number of parameters,
    the image size or the batch size, so a γ tuned on one model carries over to a larger one.
    ``sum`` uses the terms exactly as written in the method (S summed over parameters, P
    summed over pixels and the batch), the form in which γ = ½ gives the Bayesian posterior.

    **Stopping.** P has no lower bound: give the trainer a step budget (``max_steps``),
    optionally a ``target_forget_loss`` (fit stops at the first validation whose forget-set
    denoising error reaches it), and add ``UnlearningGuard`` to stop on NaN/inf.

    Hooks a subclass may override: ``plasticity_loss(batch)``, ``stability_loss()``,
    ``unlearning_parameters()``, and ``load_model()`` (what network to unlearn). The other
    arguments are ``UnlearningModule``'s.

    Args:
        pretrained: the model to unlearn: a diffusers directory (e.g. the export of
            ``ExportPretrained``), its Hub ID or a ``DiffusionModule`` checkpoint. It must
            stay readable: loading a VDU checkpoint rebuilds the architecture from it.
        gamma: γ in (0, 1), the weight of the stability term.
        residual: ``plain`` (the method's P) or ``centred``: each forget image's residual
            ε − ε_θ minus its mean per channel, so a shift of the whole prediction (the
            haze an evaluator may read as a digit) does not raise P (a deviation from the
            method, see docs/unlearning.md).
        hinge_factor: k > 1, or None: each forget example's error counts up to k times the
            original network's error on the same noised input (``hinged_error``), so P is
            bounded and stops pushing an example once it is forgotten (a deviation; costs
            one forward of the frozen original per step).
        forget_timesteps: (lo, hi): P draws t from lo..hi−1 only (None: all T timesteps).
        preconditioner: ``none``, or ``prior``: every gradient entry is multiplied by its
            prior variance σ*² (divided by their mean), a natural-gradient step for the
            prior. With SGD the weights that varied along the checkpoints move most and the
            stability term's pull becomes uniform; Adam's per-weight normalisation undoes
            it, so it is refused with Adam.

    Example:
        >>> module = VDUModule("runs/mnist5k/ddpm", gamma=0.5)  # doctest: +SKIP
        >>> prior = ParameterPrior.load("prior_trajectory.safetensors")  # doctest: +SKIP
        >>> module.set_prior(prior)  # doctest: +SKIP
    """

    def __init__(self, pretrained: str, gamma: float = 0.5, residual: str = "plain",
                 hinge_factor: float | None = None,
                 forget_timesteps: tuple[int, int] | None = None,
                 preconditioner: str = "none", **kwargs: Any) -> None:
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {gamma!r}: 0 is plain gradient "
                             "ascent (GradientAscentModule), 1 never forgets")
        check_choice("residual", residual, PLASTICITY_RESIDUALS)
        check_choice("preconditioner", preconditioner, PRECONDITIONERS)
        if hinge_factor is not None and not hinge_factor > 1.0:
            raise ValueError(f"hinge_factor must be > 1 or None, got {hinge_factor!r}")
        if preconditioner == "prior" and kwargs.get("optimizer", "adam") != "sgd":
            raise ValueError("preconditioner='prior' needs optimizer='sgd': Adam divides "
                             "each gradient entry by its own scale and undoes the prior's")
        super().__init__(pretrained, **kwargs)
        if forget_timesteps is not None:
            low, high = forget_timesteps = tuple(forget_timesteps)
            if not 0 <= low < high <= len(self.weight_per_timestep):
                raise ValueError(f"forget_timesteps must be (lo, hi) with 0 <= lo < hi <= "
                                 f"{len(self.weight_per_timestep)}, got {forget_timesteps!r}")
        # Read from here, not hparams (see UnlearningModule).
        self.gamma, self.residual, self.hinge_factor = gamma, residual, hinge_factor
        self.forget_timesteps, self.preconditioner = forget_timesteps, preconditioner
        self.prior: ParameterPrior | None = None
        self._prior_cache: tuple[Any, ...] | None = None
        self._parameter_cache: tuple[Any, ...] | None = None
        self._scale_cache: tuple[Any, ...] | None = None

    # ---- hooks a subclass may override ------------------------------------------------------
    def unlearning_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """What moves: the parameters the prior covers (all, before a prior is set)."""
        for name, parameter in self.unet.named_parameters():
            if self.prior is None or name in self.prior.mean:
                yield name, parameter

    def stability_loss(self) -> torch.Tensor:
        """S(θ) = Σ (θ − μ*)² / (2σ*²) (÷ entries for ``mean``), in fp32, one fused pass.

        Under FSDP2 each rank sums its own shard (``_prior_tensors``) and ``sum_over_shards``
        adds the ranks' parts."""
        params, means, inv_stds = self._prior_tensors()
        total = self.sum_over_shards(stability_penalty(params, means, inv_stds, "sum"))
        return total / self.prior.numel if self.reduction == "mean" else total

    def plasticity_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """P(θ) = −C_t-weighted forget-set error, measured as ``residual``,
        ``hinge_factor`` and ``forget_timesteps`` say (the method's P by default)."""
        if (self.residual, self.hinge_factor, self.forget_timesteps) == ("plain", None, None):
            return super().plasticity_loss(batch)
        x_t, noise, t = self.noised(batch["image"], self.noise.generator, self.forget_timesteps)
        labels = batch["label"] if self.conditional else None
        centred = self.residual == "centred"
        errors = per_example_error(predict_noise(self.unet, x_t, t, labels), noise, centred,
                                   self.reduction)
        if self.hinge_factor is not None:
            with torch.no_grad():
                reference = per_example_error(predict_noise(self.original_unet, x_t, t, labels),
                                              noise, centred, self.reduction)
            errors = hinged_error(errors, reference, self.hinge_factor)
        weighted = errors * self.weight_per_timestep.to(errors.device)[t]
        return -(weighted.mean() if self.reduction == "mean" else weighted.sum())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """With ``preconditioner='prior'``: each gradient entry × σ*² / mean σ*²."""
        if self.preconditioner != "prior":
            return
        _, _, inv_stds = self._prior_tensors()
        # Built again whenever the prior tensors are (another device or sharding).
        if self._scale_cache is None or self._scale_cache[0] is not self._prior_cache:
            # The mean is over the whole prior, alike on every rank (not over a shard).
            mean_var = float(sum(v.sum() for v in self.prior.var.values())) / self.prior.numel
            scales = [inv_std.pow(-2) / mean_var for inv_std in inv_stds]
            self._scale_cache = (self._prior_cache, scales)
        for parameter, scale in zip(self._parameter_cache[1], self._scale_cache[1]):
            grad = parameter.grad
            if grad is not None:
                (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(scale)

    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        """γ·S + (1 − γ)·P; only the forget part of a batch is used (VDU needs no D_r)."""
        forget = self.split_batch(batch)[0]
        stability = self.stability_loss()
        plasticity = self.plasticity_loss(forget)
        gamma = self.gamma
        loss = gamma * stability + (1.0 - gamma) * plasticity
        return {"stability": stability, "plasticity": plasticity, "loss": loss}

    # ---- the prior ------------------------------------------------------------------------
    def set_prior(self, prior: ParameterPrior) -> None:
        """Use ``prior`` (refused if it does not match the network); what
        ``unlearning_parameters()`` then leaves out (by default, what the prior does not
        cover) is frozen."""
        prior.check_matches(self.unet.named_parameters(), "the model being unlearned")
        self.prior = prior
        self._prior_cache = self._parameter_cache = None
        self.freeze_fixed_parameters()

    def _prior_tensors(self) -> tuple[list[torch.Tensor], ...]:
        """Parameters, μ* and 1/σ* aligned, on the parameters' device (cached).

        Under FSDP2 (``ModelParallelStrategy``) the parameters are DTensor shards: this rank's
        local shards come back, with the same slices of μ* and 1/σ*.
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
            self._parameter_cache = (first, params, self._shard_layout(params))
        _, params, layout = self._parameter_cache
        device = params[0].device
        if self._prior_cache is None or self._prior_cache[0] != (device, layout):
            if layout is None:
                prior = self.prior.to(device)
                means = [prior.mean[n] for n in prior.names]
                inv_stds = [prior.var[n].rsqrt() for n in prior.names]
            else:
                # Slice each prior tensor exactly as its parameter is sharded; every rank holds
                # the same prior, so no data moves (src_data_rank=None); clone() keeps the slice
                # alone, not the whole tensor it is cut from.
                def local(t: torch.Tensor) -> torch.Tensor:
                    return distribute_tensor(t, *layout, src_data_rank=None).to_local().clone()
                means = [local(self.prior.mean[n]) for n in self.prior.names]
                inv_stds = [local(self.prior.var[n]).rsqrt() for n in self.prior.names]
            self._prior_cache = ((device, layout), means, inv_stds)
        if layout is not None:
            params = [p.to_local() for p in params]
        return params, *self._prior_cache[1:]

    def _shard_layout(self, params: list[torch.Tensor | None]) -> tuple[Any, ...] | None:
        """(mesh, placements) shared by DTensor parameters (FSDP2), None for full tensors;
        refuses parameters that are neither (FSDP1 shards outside their unit's forward)."""
        sharded = [isinstance(p, DTensor) for p in params]
        if any(sharded):
            layouts = {(p.device_mesh, tuple(p.placements)) for p in params
                       if isinstance(p, DTensor)}
            if not all(sharded) or len(layouts) > 1:
                raise RuntimeError("the stability term needs every parameter the prior covers "
                                   "sharded alike by FSDP2 (one mesh, one placement): shard "
                                   f"the whole network; found {len(layouts)} layout(s) and "
                                   f"{sharded.count(False)} unsharded parameter(s)")
            return layouts.pop()
        hidden = [f"{n}: {None if p is None else tuple(p.shape)}, prior "
                  f"{tuple(self.prior.mean[n].shape)}" for n, p in zip(self.prior.names, params)
                  if p is None or p.shape != self.prior.mean[n].shape]
        if hidden:
            raise RuntimeError(
                f"the stability term cannot see the full parameters it covers, e.g. "
                f"{hidden[:3]}: FSDPStrategy shards the parameters of submodules it wraps "
                "(auto_wrap_policy) outside their own forward, and use_orig_params=False hides "
                "them. Use FSDPStrategy without auto_wrap_policy, ModelParallelStrategy "
                "(FSDP2) or DDP; see docs/distributed.md"
            )
        return None

    def sum_over_shards(self, local: torch.Tensor) -> torch.Tensor:
        """A sum over the prior's entries, from this rank's part of it: unchanged unless the
        parameters are FSDP2 shards, where the ranks' parts are all-reduced (one scalar).
        Only the value crosses ranks: a shard's gradient is that of its own part, which no
        other rank's part depends on (FSDP2 reduce-scatters only the network's gradients).
        Call it after ``_prior_tensors()``, whose layout it uses."""
        layout = self._parameter_cache[2] if self._parameter_cache is not None else None
        if layout is None:
            return local
        mesh, placements = layout
        # Partial over the mesh dimensions that shard, i.e. "the sum of the ranks' parts";
        # full_tensor() all-reduces it.
        parts = [Partial() if p.is_shard() else Replicate() for p in placements]
        total = DTensor.from_local(local.detach(), mesh, parts).full_tensor()
        return local + (total - local.detach())

    def configure_model(self) -> None:
        """Shard the network with FSDP2 under ``ModelParallelStrategy`` (which requires this
        hook): each UNet block, then the rest. Other strategies pass no mesh: nothing to do."""
        mesh = self.device_mesh
        # Lightning calls this hook again for every Trainer call: shard once.
        if mesh is None or isinstance(self.unet, FSDPModule):
            return
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(f"{type(self).__name__} shards data-parallel only: use "
                             f"ModelParallelStrategy(data_parallel_size={mesh.size()}, "
                             "tensor_parallel_size=1)")
        data_parallel = mesh["data_parallel"]
        blocks = [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]
        for block in blocks:
            if block is not None:
                fully_shard(block, mesh=data_parallel)
        fully_shard(self.unet, mesh=data_parallel)

    def on_fit_start(self) -> None:
        if self.prior is None and type(self).stability_loss is VDUModule.stability_loss:
            raise RuntimeError(f"{type(self).__name__} has no prior: add the CheckpointPrior "
                               "callback (trainer.callbacks) or call set_prior() before fit")

    # ---- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.prior is not None:
            checkpoint[PRIOR_KEY] = self.prior.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        path = self._trainer.ckpt_path if self._trainer is not None else "being loaded"
        prior = prior_in_checkpoint(checkpoint, path)
        if prior is not None:
            self.set_prior(prior)
