"""What a diffusion model says about real images: its variational bound in bits per dimension
and its denoising error, per image. No classifier involved.

Unlearning claims to make the model worse at the forgotten data and not at the rest; this
measures exactly that on held-out real images. For a DDPM with ε-prediction (Ho et al.
2020, with T steps, 0-based t here):

    −log p(x_0) ≤ L_T + Σ_{t=1}^{T−1} L_t + L_0   (nats; ÷ D ln 2 for bits per dimension)

* L_T = KL(q(x_T | x_0) ‖ N(0, I)), in closed form;
* L_t = β_t² / (2 σ_t² α_t (1 − ᾱ_t)) · ‖ε − ε_θ(x_t, t)‖² with σ_t² the posterior variance
  β̃_t (the reverse process's "fixed small" variance, for which the KL has no other term);
* L_0 = −log p(x_0 | x_1): a Gaussian of mean μ_θ(x_1) and variance β̃_1 (Ho et al.'s clipped
  value), discretised into the 256 bins of an 8-bit image on [−1, 1], so x_0 is read at 8 bits.

The sum over t is estimated by Monte Carlo with ``timesteps`` stratified draws of t per image
(every t once when ``timesteps`` = T − 1), each with one draw of ε. Image i's draws come from
a generator seeded by (``seed``, i), so two models scored on the same images see the same t
and ε whatever the batch size: their difference is what the models do, not the draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vdu_lightning.diffusion import predict_noise
from vdu_lightning.losses import elbo_weights, posterior_variance

#: Half the width of one of the 256 bins of an 8-bit image on [−1, 1].
_HALF_BIN = 1.0 / 255.0


@dataclass
class Likelihood:
    """Per-image results: ``bits_per_dim`` (the bound) and ``denoising_error`` (the mean of
    ‖ε − ε_θ‖² per pixel over the drawn t ≥ 1, the "simple" loss), both float64 ``[N]``."""

    bits_per_dim: Tensor
    denoising_error: Tensor


def _standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretised_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per entry for x on the 256-level grid of [−1, 1] under a Gaussian of ``mean``
    and standard deviation exp(``log_scale``), integrated over x's bin (the edge bins reach
    to ±∞)."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inv_std * (centred + _HALF_BIN))
    cdf_minus = _standard_normal_cdf(inv_std * (centred - _HALF_BIN))
    tiny = 1e-12
    log_cdf_plus = torch.log(cdf_plus.clamp_min(tiny))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp_min(tiny))
    log_bin = torch.log((cdf_plus - cdf_minus).clamp_min(tiny))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


def quantise(images: Tensor) -> Tensor:
    """Images in [−1, 1] moved to the nearest of the 256 levels of an 8-bit image."""
    return torch.round((images.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def stratified_timesteps(count: int, steps: int, generator: torch.Generator) -> Tensor:
    """``count`` draws of t in 1..steps−1, one uniform draw in each of as many equal strata
    (each t exactly once when ``count`` = steps − 1)."""
    edges = torch.linspace(1, steps, count + 1, dtype=torch.float64)
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    return (edges[:-1] + u * (edges[1:] - edges[:-1])).floor().long().clamp(1, steps - 1)


def image_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image ``index``'s draws: the same for every model and batch size.

    The CPU generator keeps 32 bits of its seed: the seed is spread by a large odd factor so
    that the images of one seed never share a stream, nor those of nearby seeds."""
    return torch.Generator().manual_seed((seed * 2654435761 + index) % 2**32)


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
        batch_size: network evaluations per forward pass (memory is bounded by it).

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
    steps = len(betas)
    if steps < 2:
        raise ValueError("the bound needs a schedule of at least 2 steps")
    schedule = {"betas": betas.cpu().double(), "weights": elbo_weights(betas.cpu()),
                "variance": posterior_variance(betas.cpu())}
    schedule["alpha_bars"] = torch.cumprod(1.0 - schedule["betas"], 0)
    was_training = unet.training
    unet.eval()
    device = next(unet.parameters()).device
    per_image = timesteps + 1  # the draws of t ≥ 1, then t = 0 for the decoder
    chunk = max(1, batch_size // per_image)
    bits, errors = [], []
    try:
        for start in range(0, len(images), chunk):
            part = slice(start, start + chunk)
            x0 = quantise(images[part].cpu().double())
            draws = [image_generator(seed, start + i) for i in range(len(x0))]
            t_draws = torch.stack([stratified_timesteps(timesteps, steps, g) for g in draws])
            noise = torch.stack([torch.randn((per_image, *x0.shape[1:]), generator=g,
                                             dtype=torch.float64) for g in draws])
            t_all = torch.cat([t_draws, torch.zeros(len(x0), 1, dtype=torch.long)], 1)
            cond = None if labels is None else labels[part].repeat_interleave(per_image)
            predicted, x_t = _predict(unet, schedule, x0.repeat_interleave(per_image, 0),
                                      t_all.flatten(), noise.flatten(0, 1), cond, device)
            predicted = predicted.view_as(noise)
            squared = (noise - predicted).square().flatten(2).sum(2)[:, :timesteps]
            middle = (schedule["weights"][t_draws] * squared).mean(1) * (steps - 1)
            decoder = _decoder_nll(schedule, x0, x_t.view_as(noise)[:, -1], predicted[:, -1])
            nats = _prior_kl(schedule, x0) + middle + decoder
            dims = x0[0].numel()
            bits.append(nats / (dims * math.log(2.0)))
            errors.append(squared.mean(1) / dims)
    finally:
        unet.train(was_training)
    return Likelihood(bits_per_dim=torch.cat(bits), denoising_error=torch.cat(errors))


def _predict(unet: nn.Module, schedule: dict[str, Tensor], x0: Tensor, t: Tensor, eps: Tensor,
             labels: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """(ε_θ(x_t, t), x_t) for every (x_0, t, ε), float64 on the CPU."""
    a_bar = schedule["alpha_bars"][t].view(-1, *[1] * (x0.dim() - 1))
    x_t = a_bar.sqrt() * x0 + (1.0 - a_bar).sqrt() * eps
    cond = None if labels is None else labels.to(device)
    predicted = predict_noise(unet, x_t.float().to(device), t.to(device), cond)
    return predicted.double().cpu(), x_t


def _decoder_nll(schedule: dict[str, Tensor], x0: Tensor, x1: Tensor, predicted: Tensor
                 ) -> Tensor:
    """−log p(x_0 | x_1) per image (nats), with μ_θ from the predicted noise at t = 0."""
    beta, a_bar = schedule["betas"][0], schedule["alpha_bars"][0]
    mean = (x1 - beta / (1.0 - a_bar).sqrt() * predicted) / (1.0 - beta).sqrt()
    log_scale = (0.5 * torch.log(schedule["variance"][0])).expand_as(mean)
    return -discretised_gaussian_log_likelihood(x0, mean, log_scale).flatten(1).sum(1)


def _prior_kl(schedule: dict[str, Tensor], x0: Tensor) -> Tensor:
    """KL(q(x_T | x_0) ‖ N(0, I)) per image (nats)."""
    a_bar = schedule["alpha_bars"][-1]
    variance = 1.0 - a_bar
    kl = 0.5 * (a_bar * x0.square() + variance - 1.0 - torch.log(variance))
    return kl.flatten(1).sum(1)


def likelihood_change(original: dict[str, Likelihood], unlearned: dict[str, Likelihood]
                      ) -> dict[str, Any]:
    """How the bound and the denoising error moved on each part (``forget``, ``retain``) of
    held-out real images, with the standard error of each mean increase over the images.

    ``forget_minus_retain`` is the forget part's increase in bits per dimension less the
    retain part's: what the model lost on the forgotten data beyond what it lost everywhere.
    ``selectivity`` is their ratio, given only when the retain increase is more than twice its
    standard error (a ratio over a noisy or negative denominator means nothing): a selective
    method has a large ratio, a method that damages everything a ratio near 1."""
    parts: dict[str, Any] = {}
    for part in original:
        before, after = original[part], unlearned[part]
        increase = after.bits_per_dim - before.bits_per_dim
        parts[part] = {
            "images": len(increase),
            "bits_per_dim_original": float(before.bits_per_dim.mean()),
            "bits_per_dim_unlearned": float(after.bits_per_dim.mean()),
            "bits_per_dim_increase": float(increase.mean()),
            "bits_per_dim_increase_se": (float(increase.std() / math.sqrt(len(increase)))
                                         if len(increase) > 1 else None),
            "denoising_error_original": float(before.denoising_error.mean()),
            "denoising_error_unlearned": float(after.denoising_error.mean()),
            "denoising_error_increase": float(
                (after.denoising_error - before.denoising_error).mean()),
        }
    result: dict[str, Any] = {**parts, "forget_minus_retain": None, "selectivity": None}
    if "forget" in parts and "retain" in parts:
        forget, retain = parts["forget"], parts["retain"]
        result["forget_minus_retain"] = (forget["bits_per_dim_increase"]
                                         - retain["bits_per_dim_increase"])
        se = retain["bits_per_dim_increase_se"]
        if se is not None and retain["bits_per_dim_increase"] > 2 * se:
            result["selectivity"] = (forget["bits_per_dim_increase"]
                                     / retain["bits_per_dim_increase"])
    return result
