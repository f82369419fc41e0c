"""SalUn: unlearn through the weights most salient to the forget set only."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from vdu_lightning.diffusion import predict_noise
from vdu_lightning.losses import denoising_error
from vdu_lightning.modules.unlearning import UnlearningModule

#: The checkpoint key of the mask: a resumed run keeps the mask of θ*, not of its weights.
MASK_KEY = "salun_mask"


def saliency_mask(gradients: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """1 where |gradient| is among the top ``fraction`` of all entries (one global threshold).

    Example:
        >>> mask = saliency_mask({"a": torch.tensor([0.1, -3.0]), "b": torch.tensor([2.0, 0.0])},
        ...                      0.5)
        >>> mask["a"].tolist(), mask["b"].tolist()
        ([False, True], [True, False])
    """
    magnitudes = torch.cat([g.abs().flatten().float().cpu() for g in gradients.values()])
    keep = max(1, round(fraction * magnitudes.numel()))
    # Indices, not a threshold: ties (e.g. many zero gradients) must not let more move.
    flat = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    flat[magnitudes.topk(keep).indices] = True
    masks, start = {}, 0
    for name, g in gradients.items():
        masks[name] = flat[start:start + g.numel()].view(g.shape).to(g.device)
        start += g.numel()
    return masks


class SalUnModule(UnlearningModule):
    """SalUn (docs/method.md §7): a saliency mask, then forget with the masked weights only.

    At the start of fit one pass over the whole forget set gives the gradient of its
    denoising error at θ*; the ``saliency`` fraction of weights with the largest |gradient|
    may move, the others keep their pre-trained values (their gradients are zeroed). The
    forget term is the random-label loss on a label-conditional model (ε_θ(x_t | c) regressed
    to the stop-gradient ε_θ(x_t | c'), c' ≠ c) and gradient ascent (P) on an unconditional
    one; ``retain_weight`` β adds β·(denoising error on D_r).

    Args:
        pretrained: as ``UnlearningModule`` (and its other arguments).
        saliency: the fraction of weights that may move (published: 0.5).
        retain_weight: β (published: 1e-3; 0 needs no retain data, and is data-constrained).
        mask_batch_size: images per pass while computing the mask.

    Example:
        >>> module = SalUnModule("runs/mnist5k/ddpm", saliency=0.5, retain_weight=0.0)
        ... # doctest: +SKIP
    """

    def __init__(self, pretrained: str, saliency: float = 0.5, retain_weight: float = 1e-3,
                 mask_batch_size: int = 64, **kwargs: Any) -> None:
        if not 0.0 < saliency <= 1.0:
            raise ValueError(f"saliency must be in (0, 1], got {saliency!r}")
        if retain_weight < 0:
            raise ValueError(f"retain_weight must be >= 0, got {retain_weight!r}")
        if kwargs.get("weight_decay", 0.0):
            raise ValueError("SalUnModule needs weight_decay=0: weight decay would move the "
                             "weights outside the saliency mask")
        super().__init__(pretrained, **kwargs)
        self.mask: dict[str, torch.Tensor] | None = None
        self.data_constrained = retain_weight == 0

    # ---- the mask -------------------------------------------------------------------------
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        if self.mask is None:
            self.mask = saliency_mask(self._forget_gradients(), self.hparams.saliency)
        self.mask = {name: mask.to(self.device) for name, mask in self.mask.items()}
        moving = sum(int(m.sum()) for m in self.mask.values())
        total = sum(m.numel() for m in self.mask.values())
        self.print(f"SalUn: {moving:,} of {total:,} weights may move")

    def _forget_gradients(self) -> dict[str, torch.Tensor]:
        """∇θ of the forget-set denoising error at the current (pre-trained) weights.

        Every rank passes over the whole forget set with the same seeded noise, so every rank
        gets the same mask without communicating.
        """
        forget_set = self.trainer.datamodule.forget_set
        loader = DataLoader(forget_set, batch_size=self.hparams.mask_batch_size)
        generator = torch.Generator(self.device).manual_seed(0)
        named = [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]
        self.unet.zero_grad(set_to_none=True)
        for batch in loader:
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            predicted, noise, _ = self._predict_noise_of(batch, generator)
            (denoising_error(predicted, noise) * len(noise) / len(forget_set)).backward()
        gradients = {n: p.grad.detach().clone() for n, p in named if p.grad is not None}
        self.unet.zero_grad(set_to_none=True)
        return gradients

    @override
    def on_after_backward(self) -> None:
        for name, parameter in self.unet.named_parameters():
            if parameter.grad is not None:
                mask = self.mask.get(name)
                parameter.grad.mul_(mask if mask is not None else 0.0)

    # ---- the objective --------------------------------------------------------------------
    def random_label_loss(self, forget: dict[str, torch.Tensor]) -> torch.Tensor:
        """‖ε_θ(x_t | c) − sg[ε_θ(x_t | c')]‖² with c' drawn among the other labels."""
        x_t, _, t = self.noised(forget["image"], self.noise.generator)
        labels = forget["label"]
        shift = torch.randint(1, self.num_classes, labels.shape, device=labels.device,
                              generator=self.noise.generator)
        with torch.no_grad():
            target = predict_noise(self.unet, x_t, t, (labels + shift) % self.num_classes)
        weights = self.weight_per_timestep.to(x_t.device)[t]
        predicted = predict_noise(self.unet, x_t, t, labels)
        return denoising_error(predicted, target, weights, self.reduction)

    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        forget, _ = self.split_batch(batch)
        if self.conditional:
            terms = {"random_label": self.random_label_loss(forget)}
        else:
            terms = {"plasticity": self.plasticity_loss(forget)}
        loss = next(iter(terms.values()))
        if self.hparams.retain_weight > 0:
            terms["retain"] = self.denoising_loss(self.retain_part(batch))
            loss = loss + self.hparams.retain_weight * terms["retain"]
        terms["loss"] = loss
        return terms

    # ---- checkpoints ----------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.mask is not None:
            checkpoint[MASK_KEY] = {n: m.cpu() for n, m in self.mask.items()}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if MASK_KEY in checkpoint:
            self.mask = dict(checkpoint[MASK_KEY])
