"""The loss terms of Score Forgetting Distillation in plain torch (docs/method.md §6).

* ``x0_from_epsilon``: the x_0-prediction f(x_t, t) of an ε-predicting network;
* ``fake_score_loss``: the fake-score network's denoising score matching on generator samples;
* ``sid_generator_loss``: Score identity Distillation's generator loss ℓ, with the
  stop-gradient on its normaliser ω.

No Lightning here.
"""

from __future__ import annotations

import torch


def x0_from_epsilon(x_t: torch.Tensor, epsilon: torch.Tensor, alphas_cumprod: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """f(x_t, t) = (x_t − √(1 − ᾱ_t)·ε) / √ᾱ_t, the x_0 that ``add_noise`` would have noised.

    Example:
        >>> a = torch.tensor([0.25])
        >>> x0_from_epsilon(torch.tensor([[1.0]]), torch.tensor([[0.0]]), a, torch.tensor([0]))
        tensor([[2.]])
    """
    alpha = alphas_cumprod.to(x_t.device, torch.float32)[t].view(-1, *([1] * (x_t.dim() - 1)))
    return (x_t.float() - (1 - alpha).sqrt() * epsilon.float()) / alpha.sqrt()


def fake_score_loss(predicted: torch.Tensor, noise: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """E‖ε − ε_ψ(x_t, t, c)‖², the mean over the batch of per-sample sums over pixels (each
    times its weight, e.g. a_r or a_f, when ``weights`` are given)."""
    per_sample = (predicted.float() - noise.float()).square().flatten(1).sum(1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


def sid_generator_loss(teacher_x0: torch.Tensor, fake_x0: torch.Tensor,
                       generated: torch.Tensor, alpha: float,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """ℓ = Σ (f_φ − f_ψ)·[(f_φ − x_g) − α(f_φ − f_ψ)] / ω per sample, averaged over the batch
    (each sample times its weight, e.g. b_r or b_f, when ``weights`` are given).

    ω = mean |f_φ − x_g| over each sample's pixels, without gradient (it only normalises).
    Gradients reach the generator through x_g and, via x_t, through f_φ and f_ψ.

    Example:
        >>> f_phi, f_psi, x_g = torch.ones(1, 2), torch.zeros(1, 2), torch.zeros(1, 2)
        >>> sid_generator_loss(f_phi, f_psi, x_g, alpha=1.2)  # 2·(1 − 1.2)·1 / 1
        tensor(-0.4000)
    """
    teacher_x0, fake_x0, generated = teacher_x0.float(), fake_x0.float(), generated.float()
    dims = tuple(range(1, generated.dim()))
    omega = (teacher_x0 - generated).abs().mean(dim=dims, keepdim=True).detach()
    gap = teacher_x0 - fake_x0
    per_sample = (gap * ((teacher_x0 - generated) - alpha * gap) / omega).sum(dim=dims)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()
