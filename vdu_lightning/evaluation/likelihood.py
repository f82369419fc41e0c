"""What a diffusion model says about real images: its variational bound in bits per dimension
and its denoising error, per image. No classifier involved.

Unlearning claims to make the model worse at the forgotten data and not at the rest; this
measures exactly that on held-out real images, which neither the model nor the unlearning
ever saw. For a DDPM with ε-prediction (Ho et al. 2020, with T steps, 0-based t here):

    −log p(x_0) ≤ L_T + Σ_{t=1}^{T−1} L_t + L_0   (nats; ÷ D ln 2 for bits per dimension)

* L_T = KL(q(x_T | x_0) ‖ N(0, I)), in closed form;
* L_t = β_t² / (2 σ_t² α_t (1 − ᾱ_t)) · ‖ε − ε_θ(x_t, t)‖² with σ_t² the posterior variance
  β̃_t (the reverse process's "fixed small" variance, for which the KL has no other term);
* L_0 = −log p(x_0 | x_1): a Gaussian of mean μ_θ(x_1) and variance β̃_1 (Ho et al.'s clipped
  value), discretised into the 256 bins of an 8-bit image on [−1, 1], so x_0 is read at 8 bits.

The sum over t is estimated by Monte Carlo with ``timesteps`` stratified draws per image
(exact when every t is drawn). The draws come from a seeded generator in a fixed order, so
two models scored on the same images see the same t and ε: their difference is what the
models do, not the draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vdu_lightning.diffusion import predict_noise

#: Half the width of one of the 256 bins of an 8-bit image on [−1, 1].
_HALF_BIN = 1.0 / 255.0


@dataclass
class Likelihood:
    """Per-image results: ``bits_per_dim`` (the bound) and ``denoising_error`` (the mean of
    ‖ε − ε_θ‖² per pixel over the drawn t ≥ 1, the "simple" loss), both float64 ``[N]``."""

    bits_per_dim: Tensor
    denoising_error: Tensor


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretised_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per entry for x on the 256-level grid of [−1, 1] under a Gaussian of ``mean``
    and standard deviation exp(``log_scale``), integrated over x's bin (the edge bins reach
    to ±∞)."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centred + _HALF_BIN))
    cdf_minus = _approx_standard_normal_cdf(inv_std * (centred - _HALF_BIN))
    tiny = 1e-12
    log_cdf_plus = torch.log(cdf_plus.clamp_min(tiny))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp_min(tiny))
    log_bin = torch.log((cdf_plus - cdf_minus).clamp_min(tiny))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


def quantise(images: Tensor) -> Tensor:
    """Images in [−1, 1] moved to the nearest of the 256 levels of an 8-bit image."""
    return torch.round((images.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


class _Schedule:
    """The DDPM quantities the bound needs, float64, from the training betas."""

    def __init__(self, betas: Tensor) -> None:
        self.betas = betas.to(torch.float64)
        self.alphas = 1.0 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, 0)
        previous = torch.cat([self.alpha_bars.new_ones(1), self.alpha_bars[:-1]])
        posterior = self.betas * (1.0 - previous) / (1.0 - self.alpha_bars)
        # β̃_0 is 0: the decoder uses β̃_1 instead (Ho et al.'s clipped log-variance).
        self.posterior_variance = torch.cat([posterior[1:2], posterior[1:]])
        self.weights = self.betas.square() / (
            2.0 * self.posterior_variance * self.alphas * (1.0 - self.alpha_bars))

    @property
    def num_steps(self) -> int:
        return len(self.betas)


def _stratified_timesteps(count: int, per_image: int, steps: int,
                          generator: torch.Generator) -> Tensor:
    """``per_image`` draws of t in 1..steps−1 per image, one from each of as many equal strata."""
    edges = torch.linspace(1, steps, per_image + 1, dtype=torch.float64)
    low, high = edges[:-1], edges[1:]
    u = torch.rand(count, per_image, generator=generator, dtype=torch.float64)
    return (low + u * (high - low)).floor().long().clamp(1, steps - 1)


@torch.no_grad()
def variational_bound(unet: nn.Module, betas: Tensor, images: Tensor,
                      labels: Tensor | None = None, timesteps: int = 8, seed: int = 0,
                      batch_size: int = 256) -> Likelihood:
    """The bound in bits per dimension and the denoising error of each image (see the module).

    Args:
        unet: an ε-predicting network ``unet(x_t, t, class_labels=...)`` (diffusers' UNets).
        betas: the model's training betas ``[T]``.
        images: real images ``[N, C, H, W]`` in [−1, 1].
        labels: their labels, for a label-conditional network (None: unconditional).
        timesteps: Monte Carlo draws of t ≥ 1 per image, stratified over 1..T−1.
        seed: the seed of the t and ε draws (use the same for the models you compare).
        batch_size: network evaluations per forward pass.

    Example:
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
        ...     block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
        ...     down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        >>> result = variational_bound(unet, torch.linspace(1e-4, 0.02, 100),
        ...                            torch.zeros(3, 1, 8, 8), timesteps=4)
        >>> result.bits_per_dim.shape
        torch.Size([3])
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be at least 1, got {timesteps}")
    schedule = _Schedule(betas.cpu())
    if schedule.num_steps < 2:
        raise ValueError("the bound needs a schedule of at least 2 steps")
    was_training = unet.training
    unet.eval()
    device = next(unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    x0 = quantise(images.cpu().double())
    count, dims = x0.shape[0], x0[0].numel()
    t_draws = _stratified_timesteps(count, timesteps, schedule.num_steps, generator)
    # One ε per (image, draw) and one for the decoder term, in a fixed order.
    noise = torch.randn((count, timesteps + 1, *x0.shape[1:]), generator=generator,
                        dtype=torch.float64)

    # All network evaluations as one list of (image index, t, ε index), t = 0 being L_0's.
    image_index = torch.arange(count).repeat_interleave(timesteps + 1)
    t_all = torch.cat([t_draws, torch.zeros(count, 1, dtype=torch.long)], 1).flatten()
    eps_all = noise.flatten(0, 1)
    errors = torch.empty(len(t_all), dtype=torch.float64)
    decoder_nll = torch.zeros(count, dtype=torch.float64)
    try:
        for start in range(0, len(t_all), batch_size):
            part = slice(start, start + batch_size)
            index, t, eps = image_index[part], t_all[part], eps_all[part]
            a_bar = schedule.alpha_bars[t].view(-1, *[1] * (x0.dim() - 1))
            x_t = a_bar.sqrt() * x0[index] + (1.0 - a_bar).sqrt() * eps
            cond = None if labels is None else labels[index].to(device)
            predicted = predict_noise(unet, x_t.float().to(device), t.to(device), cond)
            predicted = predicted.double().cpu()
            errors[part] = (eps - predicted).square().flatten(1).sum(1)
            first = t == 0
            if first.any():
                decoder_nll[index[first]] = _decoder_nll(schedule, x0[index[first]],
                                                         x_t[first], predicted[first])
    finally:
        unet.train(was_training)

    errors = errors.view(count, timesteps + 1)[:, :timesteps]
    middle = (schedule.weights[t_draws] * errors).mean(1) * (schedule.num_steps - 1)
    prior = _prior_kl(schedule, x0)
    nats = prior + middle + decoder_nll
    return Likelihood(bits_per_dim=nats / (dims * math.log(2.0)),
                      denoising_error=errors.mean(1) / dims)


def _decoder_nll(schedule: _Schedule, x0: Tensor, x1: Tensor, predicted: Tensor) -> Tensor:
    """−log p(x_0 | x_1) per image (nats), with μ_θ from the predicted noise at t = 0."""
    beta, alpha, a_bar = schedule.betas[0], schedule.alphas[0], schedule.alpha_bars[0]
    mean = (x1 - beta / (1.0 - a_bar).sqrt() * predicted) / alpha.sqrt()
    log_scale = 0.5 * torch.log(schedule.posterior_variance[0])
    log_p = discretised_gaussian_log_likelihood(x0, mean, log_scale.expand_as(mean))
    return -log_p.flatten(1).sum(1)


def _prior_kl(schedule: _Schedule, x0: Tensor) -> Tensor:
    """KL(q(x_T | x_0) ‖ N(0, I)) per image (nats)."""
    a_bar = schedule.alpha_bars[-1]
    variance = 1.0 - a_bar
    kl = 0.5 * (a_bar * x0.square() + variance - 1.0 - torch.log(variance))
    return kl.flatten(1).sum(1)


def likelihood_change(original: dict[str, Likelihood], unlearned: dict[str, Likelihood]
                      ) -> dict[str, Any]:
    """How the bound and the denoising error moved on each part (``forget``, ``retain``) of
    held-out real images, and the selectivity: the forget part's increase in bits per
    dimension over the retain part's (a selective method has a large ratio, with a small
    retain increase; a method that damages everything, a ratio near 1)."""
    parts: dict[str, Any] = {}
    for part in original:
        before, after = original[part], unlearned[part]
        parts[part] = {
            "images": len(before.bits_per_dim),
            "bits_per_dim_original": float(before.bits_per_dim.mean()),
            "bits_per_dim_unlearned": float(after.bits_per_dim.mean()),
            "bits_per_dim_increase": float((after.bits_per_dim - before.bits_per_dim).mean()),
            "denoising_error_original": float(before.denoising_error.mean()),
            "denoising_error_unlearned": float(after.denoising_error.mean()),
            "denoising_error_increase": float(
                (after.denoising_error - before.denoising_error).mean()),
        }
    ratio = None
    if "forget" in parts and "retain" in parts:
        retain = parts["retain"]["bits_per_dim_increase"]
        ratio = parts["forget"]["bits_per_dim_increase"] / retain if retain else None
    return {**parts, "selectivity": ratio}
