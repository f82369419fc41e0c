"""The loss terms the methods share, in plain torch (docs/method.md §2, §7).

* ``stability_penalty``: S(θ) = Σ_i (θ_i − μ*_i)² / (2 σ*_i²), the prior's quadratic (VDU,
  the isotropic anchor and EWC's Fisher penalty);
* ``timestep_weights`` and ``denoising_error``: Σ_t C_t ‖ε − ε_θ(x_t, t)‖², whose negative is
  the plasticity inducer P(θ) (and the retain loss of the peers).

Both reduce by ``mean`` or ``sum`` (see ``VDUModule`` for why ``mean`` is the default).
No Lightning here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

REDUCTIONS = ("mean", "sum")
TIMESTEP_WEIGHTINGS = ("simple", "elbo")


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming both."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def stability_penalty(
    params: Sequence[torch.Tensor],
    means: Sequence[torch.Tensor],
    inv_stds: Sequence[torch.Tensor],
    reduction: str = "mean",
) -> torch.Tensor:
    """½ Σ ((θ − μ)/σ)² over all entries (``sum``) or divided by their number (``mean``).

    Computed in float32 whatever the autocast context, with fused multi-tensor ops: one pass
    over θ, μ and 1/σ forward and one backward, whatever the number of tensors. Its gradient
    is (θ − μ)/σ² per entry (÷ the entry count for ``mean``).

    Example:
        >>> theta = [torch.tensor([3.0], requires_grad=True)]
        >>> s = stability_penalty(theta, [torch.tensor([1.0])], [torch.tensor([0.5])], "sum")
        >>> s.backward(); s.item(), theta[0].grad.item()
        (0.5, 0.5)
    """
    check_choice("reduction", reduction, REDUCTIONS)
    if not params:
        raise ValueError("the stability penalty needs at least one parameter")
    device_type = params[0].device.type
    with torch.autocast(device_type, enabled=False):
        params32 = [p if p.dtype == torch.float32 else p.float() for p in params]
        scaled = torch._foreach_mul(torch._foreach_sub(params32, means), inv_stds)
        total = 0.5 * torch.stack(torch._foreach_norm(scaled)).square().sum()
    if reduction == "mean":
        total = total / sum(p.numel() for p in params)
    return total


def posterior_variance(betas: torch.Tensor) -> torch.Tensor:
    """β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) for t = 0..T−1 (float64), with β̃ of the second step
    at the first, where β̃ is 0 (Ho et al.'s clipped log-variance)."""
    betas = betas.to(torch.float64)
    alpha_bars = torch.cumprod(1.0 - betas, dim=0)
    alpha_bars_prev = torch.cat([alpha_bars.new_ones(1), alpha_bars[:-1]])
    variance = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)
    variance[0] = variance[1]
    return variance


def elbo_weights(betas: torch.Tensor, variance_type: str = "fixed_small") -> torch.Tensor:
    """β_t² / (2 σ_t² α_t (1 − ᾱ_t)) for t = 0..T−1 (float64, not normalised): the weight of
    ‖ε − ε_θ(x_t, t)‖² in the DDPM ELBO's term at t, with σ_t² the sampler's variance, the
    posterior variance β̃_t for ``fixed_small`` and β_t for ``fixed_large``."""
    betas = betas.to(torch.float64)
    alphas = 1.0 - betas
    alpha_bars = torch.cumprod(alphas, dim=0)
    if variance_type.startswith("fixed_small"):
        sigma2 = posterior_variance(betas)
    elif variance_type.startswith("fixed_large"):
        sigma2 = betas.clone()
    else:
        raise ValueError(f"elbo weighting needs a fixed sampler variance (fixed_small or "
                         f"fixed_large), but the scheduler's variance_type is {variance_type!r}")
    return betas.square() / (2.0 * sigma2 * alphas * (1.0 - alpha_bars))


def timestep_weights(betas: torch.Tensor, weighting: str, variance_type: str = "fixed_small"
                     ) -> torch.Tensor:
    """C_t for t = 0..T−1, normalised so that their mean is 1.

    ``simple``: C_t = 1. ``elbo``: ``elbo_weights`` (the DDPM ELBO's weights for
    ε-prediction with the sampler's variance ``variance_type``).

    Example:
        >>> timestep_weights(torch.tensor([0.1, 0.2]), "simple").tolist()
        [1.0, 1.0]
    """
    check_choice("timestep_weighting", weighting, TIMESTEP_WEIGHTINGS)
    if weighting == "simple":
        return torch.ones_like(betas, dtype=torch.float32)
    weights = elbo_weights(betas, variance_type)
    return (weights / weights.mean()).to(torch.float32)


def denoising_error(
    predicted: torch.Tensor,
    noise: torch.Tensor,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Σ_b C_{t_b} ‖ε_b − ε̂_b‖² (``sum``), or its mean over the batch and pixels (``mean``).

    ``weights`` are the C_t of each example's timestep (None: all 1). Computed in float32.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    per_example = per_example_error(predicted, noise, reduction=reduction)
    if weights is not None:
        per_example = per_example * weights.to(per_example)
    return per_example.mean() if reduction == "mean" else per_example.sum()


def per_example_error(predicted: torch.Tensor, noise: torch.Tensor, centred: bool = False,
                      reduction: str = "mean") -> torch.Tensor:
    """‖ε_b − ε̂_b‖² per example (``sum``, or its mean over the pixels for ``mean``), [B].

    ``centred`` subtracts each image's mean residual per channel first: a prediction shifted
    by the same amount over a whole image (a haze, a global intensity change) then scores
    nothing, so the error can only be raised by changing the image's content.

    Example:
        >>> noise = torch.zeros(1, 1, 2, 2)
        >>> per_example_error(noise + 1.0, noise).item(), per_example_error(
        ...     noise + 1.0, noise, centred=True).item()
        (1.0, 0.0)
    """
    residual = noise.float() - predicted.float()
    if centred:
        residual = residual - residual.mean(dim=tuple(range(2, residual.dim())), keepdim=True)
    squared = residual.square().flatten(1)
    return squared.mean(1) if reduction == "mean" else squared.sum(1)
