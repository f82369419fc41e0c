"""What VDU minimises, in plain torch (docs/method.md §2).

    L(θ) = γ·S(θ) + (1 − γ)·P(θ)
    S(θ) = Σ_i (θ_i − μ*_i)² / (2σ*_i²)            (``losses.stability_penalty``)
    P(θ) = −E_{x∈D_f, t, ε} C_t ‖ε − ε_θ(x_t, t)‖²   (``losses.denoising_error``)

``vdu_loss`` combines the terms; ``per_example_error`` (from ``losses``, with ``centred``)
and ``hinged_error`` are the forget error's shift-proof and bounded variants, ``VDUModule``'s
``residual`` and ``hinge_factor`` options (documented deviations from the method). No
Lightning here.
"""

from __future__ import annotations

import torch

from vdu_lightning.losses import per_example_error

__all__ = ["PLASTICITY_RESIDUALS", "PRECONDITIONERS", "check_gamma", "hinged_error",
           "per_example_error", "vdu_loss"]

#: How the plasticity term measures the forget-set error: ``plain`` as in the method,
#: ``centred`` with each image's mean residual removed (a global shift scores nothing).
PLASTICITY_RESIDUALS = ("plain", "centred")
#: What scales the gradients before the step: nothing, or the prior's variance σ*².
PRECONDITIONERS = ("none", "prior")


def check_gamma(gamma: float) -> None:
    """Refuse a γ outside (0, 1), where L is no longer a trade-off."""
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma!r}: 0 is plain gradient "
                         "ascent (GradientAscentModule), 1 never forgets")


def vdu_loss(stability: torch.Tensor, plasticity: torch.Tensor, gamma: float) -> torch.Tensor:
    """L = γ·S + (1 − γ)·P, for γ in (0, 1) (``check_gamma``).

    Example:
        >>> vdu_loss(torch.tensor(2.0), torch.tensor(-4.0), 0.75).item()
        0.5
    """
    return gamma * stability + (1.0 - gamma) * plasticity


def hinged_error(errors: torch.Tensor, reference: torch.Tensor, factor: float) -> torch.Tensor:
    """min(e, k·e₀) per example: the error ``errors`` counts up to ``factor`` times the
    original network's error ``reference`` on the same noised input, and no further (its
    gradient is zero beyond), so raising it cannot run away.

    Example:
        >>> hinged_error(torch.tensor([1.0, 5.0]), torch.tensor([1.0, 1.0]), 2.0).tolist()
        [1.0, 2.0]
    """
    if not factor > 1.0:
        raise ValueError(f"the hinge factor must be > 1 (the error may rise to k times the "
                         f"original's), got {factor!r}")
    return torch.minimum(errors, factor * reference.to(errors))
