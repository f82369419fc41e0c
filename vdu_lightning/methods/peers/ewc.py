"""EWC / Selective Amnesia (docs/method.md §7): a Fisher-weighted pull to θ*, generative replay,
a surrogate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from vdu_lightning.evaluation.classifier import load_classifier
from vdu_lightning.losses import check_choice
from vdu_lightning.methods.peers.fisher import diagonal_fisher
from vdu_lightning.modules.prior_penalty import PriorPenaltyModule
from vdu_lightning.prior import ParameterPrior

FORGET_OBJECTIVES = ("ascent", "surrogate")
#: Fisher entries below this count as zero (their weight is then not held at all).
_TINY_FISHER = 1e-30


class EWCModule(PriorPenaltyModule):
    """forget term + λ·Σ F_i (θ_i − θ*_i)² [+ replay]: EWC, and Selective Amnesia's parts.

    F is the diagonal Fisher of the original model on ``fisher_samples`` of its own samples
    (``fisher.py`` beside this file), computed at the start of fit, or read from
    ``fisher_path`` (written there after the first computation, so several runs share one
    estimate). It is
    kept as a prior N(θ*, 1/(2F)) (source ``fisher``), so λ·S of that prior, summed over
    parameters, is exactly the EWC penalty, and it travels in checkpoints like VDU's.

    The forget term is ``ascent`` (P, as in VDU) or ``surrogate`` (Selective Amnesia, for
    label-conditional models: the forgotten labels are trained to generate uniform noise
    images in [−1, 1]). ``replay_samples`` > 0 adds generative replay: that many samples of
    the original model, generated once, of the retained classes (a label-conditional model
    samples them by label; an unconditional one needs ``replay_classifier`` to drop the
    samples of the forgotten classes), trained on with weight ``replay_weight``.

    Args:
        pretrained: as ``UnlearningModule`` (and its other arguments).
        ewc_weight: λ (published: 10 for DDPMs, 50 for Stable Diffusion).
        fisher_samples: samples of the model the Fisher averages over.
        fisher_timesteps: timesteps per sample (None: all T, as published; fewer is cheaper).
        fisher_path: a safetensors file to read the Fisher prior from, or to write it to.
        forget_objective: ``ascent`` or ``surrogate``.
        replay_samples: generated samples to replay (0: no replay).
        replay_weight: the weight of the replay term.
        replay_classifier: a ``ClassifierModule`` directory (unconditional replay).

    **Scale.** F is the Fisher of ℓ(x) = Σ_t ‖ε − ε_θ(x_t, t)‖² (summed over pixels, as in
    the method), so with ``reduction="sum"`` the penalty is λ·Σ F (θ − θ*)² as published; with
    ``mean`` (per-pixel losses) it is divided by the pixels per image D, which keeps the ratio
    of forget term to penalty that the per-image sums have.

    Example:
        >>> module = EWCModule("runs/mnist5k/ddpm", ewc_weight=10.0, fisher_samples=64)
        ... # doctest: +SKIP
    """

    def __init__(
        self,
        pretrained: str,
        ewc_weight: float = 10.0,
        fisher_samples: int = 64,
        fisher_timesteps: int | None = None,
        fisher_path: str | None = None,
        forget_objective: str = "ascent",
        replay_samples: int = 0,
        replay_weight: float = 1.0,
        replay_classifier: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice("forget_objective", forget_objective, FORGET_OBJECTIVES)
        if ewc_weight < 0:
            raise ValueError(f"ewc_weight must be >= 0, got {ewc_weight!r}")
        if fisher_samples < 1:
            raise ValueError(f"fisher_samples must be at least 1, got {fisher_samples!r}")
        if replay_samples < 0:
            raise ValueError(f"replay_samples must be >= 0, got {replay_samples!r}")
        super().__init__(pretrained, **kwargs)
        if forget_objective == "surrogate" and not self.conditional:
            raise ValueError("forget_objective='surrogate' maps the forgotten labels to noise "
                             "images and needs a label-conditional model; this one is "
                             "unconditional: use 'ascent'")
        if replay_samples and not self.conditional and replay_classifier is None:
            raise ValueError("replay on an unconditional model needs replay_classifier (a "
                             "ClassifierModule directory) to drop samples of the forgotten "
                             "classes")
        self.replay: dict[str, torch.Tensor] | None = None

    # ---- the Fisher prior and the replay set, at the start of fit --------------------------
    @override
    def on_fit_start(self) -> None:
        if self.prior is None:  # a resumed run restored it from its checkpoint
            self.set_prior(self._fisher_prior())
        if self.hparams.replay_samples and self.replay is None:
            self.replay = self._replay_set()
        super().on_fit_start()

    def _fisher_prior(self) -> ParameterPrior:
        path = self.hparams.fisher_path
        hp = self.hparams
        if path and Path(path).is_file():
            prior = ParameterPrior.load(path)
            theta_star = dict(self.unet.named_parameters())
            other_model = [n for n in prior.names
                           if not torch.equal(prior.mean[n], theta_star[n].detach().float())]
            if prior.source != "fisher" or other_model or prior.count != hp.fisher_samples:
                raise ValueError(
                    f"fisher_path {path} holds a {prior.source!r} prior of {prior.count} "
                    f"samples{' about other weights' if other_model else ''}, not the Fisher "
                    f"of this model on {hp.fisher_samples} samples: give a new path, or "
                    "delete the file")
            rank_zero_info(f"EWC: Fisher read from {path}")
            return prior
        images = self.sample(hp.fisher_samples, seed=1, original=True)
        labels = (torch.arange(len(images)) % self.num_classes) if self.conditional else None
        fisher = diagonal_fisher(self.unet, self.scheduler, images, labels,
                                 hp.fisher_timesteps, generator=torch.Generator().manual_seed(0))
        mean = {n: p.detach().float().clone() for n, p in self.unet.named_parameters()
                if n in fisher}
        var = {n: 0.5 / f.clamp_min(_TINY_FISHER) for n, f in fisher.items()}
        prior = ParameterPrior(mean, var, count=hp.fisher_samples, source="fisher", min_var=0.0)
        if path and self.trainer.is_global_zero:
            prior.save(path)
        return prior

    def _replay_set(self) -> dict[str, torch.Tensor]:
        hp = self.hparams
        retained = self.trainer.datamodule.retain_classes
        if self.conditional:
            labels = torch.tensor(retained)[torch.arange(hp.replay_samples) % len(retained)]
            images = self.sample(hp.replay_samples, seed=2, original=True, labels=labels)
            return {"image": images, "label": labels.to(self.device)}
        images = self.sample(hp.replay_samples, seed=2, original=True)
        predicted = load_classifier(hp.replay_classifier).predict(images)[0].to(self.device)
        keep = ~torch.isin(predicted, torch.tensor(self.trainer.datamodule.forget_classes,
                                                   device=predicted.device))
        if not keep.any():
            raise ValueError("every replay sample was classified as a forgotten class: "
                             "nothing to replay")
        rank_zero_info(f"EWC: replaying {int(keep.sum())} of {len(images)} samples")
        return {"image": images[keep], "label": predicted[keep]}

    # ---- the objective --------------------------------------------------------------------
    @override
    def stability_loss(self) -> torch.Tensor:
        """λ·Σ F (θ − θ*)² (summed over parameters, as published; ÷ D for ``mean``): the
        quadratic of the prior N(θ*, 1/(2F))."""
        penalty = self.hparams.ewc_weight * self.prior_quadratic()
        if self.reduction == "mean":
            penalty = penalty / math.prod(self.sample_shape)
        return penalty

    def surrogate_loss(self, forget: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoising error of uniform noise images under the forgotten labels."""
        images = forget["image"]
        noise_images = torch.rand(images.shape, device=images.device, dtype=images.dtype,
                                  generator=self.noise.generator) * 2 - 1
        return self.denoising_loss({"image": noise_images, "label": forget["label"]})

    @override
    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        forget = self.split_batch(batch)[0]
        if self.hparams.forget_objective == "surrogate":
            terms = {"surrogate": self.surrogate_loss(forget)}
        else:
            terms = {"plasticity": self.plasticity_loss(forget)}
        terms["ewc"] = self.stability_loss()
        loss = sum(terms.values())
        if self.replay is not None:
            pick = torch.randint(0, len(self.replay["image"]), (len(forget["image"]),),
                                 generator=self.noise.generator, device=self.device)
            terms["replay"] = self.denoising_loss({k: v[pick] for k, v in self.replay.items()})
            loss = loss + self.hparams.replay_weight * terms["replay"]
        terms["loss"] = loss
        return terms
