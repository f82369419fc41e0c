"""The two terms of the VDU objective (docs/method.md §2) against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from vdu_lightning.diffusion import build_scheduler
from vdu_lightning.losses import denoising_error, stability_penalty, timestep_weights

SHAPES = [(4, 3, 3, 3), (4,), (7, 5), (2, 1, 6)]


def _penalty_inputs(seed: int = 0, offset: float = 0.0, spread: float = 1.0):
    """θ (leaf tensors with grad), μ and σ² for several tensors of different shapes."""
    generator = torch.Generator().manual_seed(seed)
    params, means, variances = [], [], []
    for shape in SHAPES:
        mean = offset + spread * torch.randn(shape, generator=generator)
        theta = mean + spread * torch.randn(shape, generator=generator)
        params.append(theta.requires_grad_(True))
        means.append(mean)
        # Variances over several orders of magnitude (as in a real prior).
        variances.append((spread ** 2) * 10.0 ** (4 * torch.rand(shape, generator=generator) - 2))
    return params, means, variances


def _reference(params, means, variances) -> float:
    """½ Σ (θ − μ)² / σ² in float64, as a plain Python sum over tensors."""
    total = 0.0
    for theta, mean, var in zip(params, means, variances):
        total += 0.5 * float(((theta.detach().double() - mean.double()) ** 2
                              / var.double()).sum())
    return total


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_stability_penalty_value_and_gradient(reduction: str) -> None:
    params, means, variances = _penalty_inputs()
    inv_stds = [v.rsqrt() for v in variances]
    entries = sum(p.numel() for p in params)
    divisor = entries if reduction == "mean" else 1

    value = stability_penalty(params, means, inv_stds, reduction)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(_reference(params, means, variances) / divisor,
                                         rel=1e-5)

    value.backward()
    for theta, mean, var in zip(params, means, variances):
        expected = (theta.detach().double() - mean.double()) / var.double() / divisor
        assert theta.grad is not None and theta.grad.shape == theta.shape
        torch.testing.assert_close(theta.grad.double(), expected, atol=1e-12, rtol=1e-5)


def test_stability_penalty_mean_is_sum_over_entry_count() -> None:
    params, means, variances = _penalty_inputs(seed=1)
    inv_stds = [v.rsqrt() for v in variances]
    total = stability_penalty(params, means, inv_stds, "sum")
    mean = stability_penalty(params, means, inv_stds, "mean")
    entries = 4 * 27 + 4 + 35 + 12
    assert sum(p.numel() for p in params) == entries
    assert mean.item() == pytest.approx(total.item() / entries, rel=1e-6)


def test_stability_penalty_is_zero_at_the_prior_mean_with_zero_gradient() -> None:
    _, means, variances = _penalty_inputs(seed=2)
    params = [m.clone().requires_grad_(True) for m in means]
    value = stability_penalty(params, means, [v.rsqrt() for v in variances], "sum")
    value.backward()
    assert value.item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)


def test_stability_penalty_refuses_bad_arguments() -> None:
    params, means, variances = _penalty_inputs()
    with pytest.raises(ValueError, match="reduction"):
        stability_penalty(params, means, [v.rsqrt() for v in variances], "max")
    with pytest.raises(ValueError, match="at least one parameter"):
        stability_penalty([], [], [], "sum")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_stability_penalty_stays_float32_under_bf16_autocast(reduction: str) -> None:
    # θ and μ near 1 differ by ~1e-3: bf16 (8 significant bits, spacing 2**-7 near 1) would
    # round most of θ − μ to 0 or ±0.0078.
    params, means, variances = _penalty_inputs(seed=3, offset=1.0, spread=1e-3)
    inv_stds = [v.rsqrt() for v in variances]
    divisor = sum(p.numel() for p in params) if reduction == "mean" else 1
    expected = _reference(params, means, variances) / divisor

    # The test can see a bf16 computation: from bf16 inputs, or only its result in bf16.
    as_bf16 = [[t.detach().to(torch.bfloat16).float() for t in ts] for ts in (params, means)]
    bf16_inputs = _reference(*as_bf16, variances) / divisor
    assert abs(bf16_inputs - expected) > 1e-2 * expected
    bf16_result = torch.tensor(expected, dtype=torch.bfloat16).item()
    assert abs(bf16_result - expected) > 1e-5 * expected

    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = stability_penalty(params, means, inv_stds, reduction)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    for theta, mean, var in zip(params, means, variances):
        assert theta.grad.dtype == torch.float32
        reference = (theta.detach().double() - mean.double()) / var.double() / divisor
        torch.testing.assert_close(theta.grad.double(), reference, atol=0, rtol=1e-4)


# ---- timestep weights -------------------------------------------------------------------------
def test_simple_weights_are_all_ones() -> None:
    weights = timestep_weights(torch.tensor([0.1, 0.2, 0.3, 0.4]), "simple")
    assert weights.dtype == torch.float32
    assert weights.tolist() == [1.0, 1.0, 1.0, 1.0]


def _normalised(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    return [v / mean for v in values]


def test_elbo_weights_fixed_small_by_hand() -> None:
    betas = [0.1, 0.2, 0.3, 0.4]
    alphas = [0.9, 0.8, 0.7, 0.6]
    alpha_bars = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7, 0.9 * 0.8 * 0.7 * 0.6]
    # Posterior variance β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t); β̃_0 = 0 is replaced by β̃_1.
    tilde_1 = 0.2 * (1 - 0.9) / (1 - 0.72)
    tilde_2 = 0.3 * (1 - 0.72) / (1 - 0.504)
    tilde_3 = 0.4 * (1 - 0.504) / (1 - 0.3024)
    sigma2 = [tilde_1, tilde_1, tilde_2, tilde_3]
    raw = [betas[t] ** 2 / (2 * sigma2[t] * alphas[t] * (1 - alpha_bars[t])) for t in range(4)]
    expected = _normalised(raw)

    weights = timestep_weights(torch.tensor(betas), "elbo")
    assert weights.dtype == torch.float32 and weights.shape == (4,)
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert sum(weights.tolist()) / 4 == pytest.approx(1.0, rel=1e-6)
    # Same for the variance type's "fixed_small_log" variant.
    assert timestep_weights(torch.tensor(betas), "elbo", "fixed_small_log").tolist() == (
        pytest.approx(expected, rel=1e-6))


def test_elbo_weights_fixed_large_by_hand() -> None:
    betas = [0.1, 0.2, 0.3, 0.4]
    alphas = [0.9, 0.8, 0.7, 0.6]
    alpha_bars = [0.9, 0.72, 0.504, 0.3024]
    # σ_t² = β_t, so C_t = β_t / (2 α_t (1 − ᾱ_t)).
    raw = [betas[t] / (2 * alphas[t] * (1 - alpha_bars[t])) for t in range(4)]
    weights = timestep_weights(torch.tensor(betas), "elbo", "fixed_large")
    assert weights.tolist() == pytest.approx(_normalised(raw), rel=1e-6)


def test_elbo_weights_do_not_depend_on_the_dtype_of_the_betas() -> None:
    betas = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    torch.testing.assert_close(timestep_weights(betas, "elbo"),
                               timestep_weights(betas.float(), "elbo"), atol=0, rtol=1e-6)


@pytest.mark.parametrize("weighting, variance_type, match", [
    ("uniform", "fixed_small", "timestep_weighting"),
    ("elbo", "learned", "learned"),
    ("elbo", "learned_range", "learned_range"),
])
def test_unknown_weightings_and_learned_variances_are_refused(
        weighting: str, variance_type: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        timestep_weights(torch.tensor([0.1, 0.2, 0.3]), weighting, variance_type)


def test_elbo_weights_of_the_default_ddpm_schedule() -> None:
    scheduler = build_scheduler()  # linear, 1e-4 .. 0.02, 1000 steps
    betas = scheduler.betas
    torch.testing.assert_close(betas.double(), torch.linspace(1e-4, 0.02, 1000,
                                                              dtype=torch.float64),
                               atol=0, rtol=2e-7)  # float32 betas
    weights = timestep_weights(betas, "elbo", scheduler.config.variance_type)
    assert weights.shape == (1000,) and weights.dtype == torch.float32
    assert torch.isfinite(weights).all() and (weights > 0).all()
    assert weights.double().mean().item() == pytest.approx(1.0, rel=1e-5)

    # Independent closed form: with σ_t² = β̃_t, C_t = β_t / (2 α_t (1 − ᾱ_{t−1})) for t ≥ 1,
    # and at t = 0 (σ_0² = β̃_1, 1 − ᾱ_0 = β_0) C_0 = β_0 / (2 β̃_1 α_0).
    b = [float(x) for x in betas.double()]
    alpha_bar, alpha_bars = 1.0, []
    for beta in b:
        alpha_bar *= 1.0 - beta
        alpha_bars.append(alpha_bar)
    tilde_1 = b[1] * (1 - alpha_bars[0]) / (1 - alpha_bars[1])
    raw = [b[0] / (2 * tilde_1 * (1 - b[0]))]
    raw += [b[t] / (2 * (1 - b[t]) * (1 - alpha_bars[t - 1])) for t in range(1, 1000)]
    assert weights.tolist() == pytest.approx(_normalised(raw), rel=1e-5)


# ---- denoising error --------------------------------------------------------------------------
def _predictions(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    predicted = torch.randn(3, 2, 4, 5, generator=generator)
    noise = torch.randn(3, 2, 4, 5, generator=generator)
    return predicted, noise


def _manual(predicted, noise, weights, reduction: str) -> float:
    batch, pixels = predicted.shape[0], predicted[0].numel()
    total = 0.0
    for b in range(batch):
        squared = sum((float(p) - float(n)) ** 2
                      for p, n in zip(predicted[b].flatten(), noise[b].flatten()))
        w = 1.0 if weights is None else float(weights[b])
        total += w * (squared / pixels if reduction == "mean" else squared)
    return total / batch if reduction == "mean" else total


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_denoising_error_against_a_manual_sum(reduction: str, weighted: bool) -> None:
    predicted, noise = _predictions()
    weights = torch.tensor([0.5, 2.0, 1.25]) if weighted else None
    value = denoising_error(predicted, noise, weights, reduction)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(_manual(predicted, noise, weights, reduction),
                                         rel=1e-5)


def test_denoising_error_mean_without_weights_is_the_usual_mse() -> None:
    predicted, noise = _predictions(seed=1)
    expected = torch.nn.functional.mse_loss(predicted.double(), noise.double()).item()
    assert denoising_error(predicted, noise).item() == pytest.approx(expected, rel=1e-6)


def test_denoising_error_is_float32_for_bf16_inputs_and_has_gradients() -> None:
    predicted, noise = _predictions(seed=2)
    predicted = predicted.to(torch.bfloat16).requires_grad_(True)
    noise = noise.to(torch.bfloat16)
    weights = torch.tensor([1.0, 3.0, 0.5])
    value = denoising_error(predicted, noise, weights, "sum")
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(_manual(predicted.detach().float(), noise.float(),
                                                 weights, "sum"), rel=1e-5)
    value.backward()
    expected = 2 * (predicted.detach().double() - noise.double()) * weights.double().view(
        -1, 1, 1, 1)
    torch.testing.assert_close(predicted.grad.double(), expected, atol=0, rtol=1e-2)


def test_denoising_error_refuses_an_unknown_reduction() -> None:
    predicted, noise = _predictions()
    with pytest.raises(ValueError, match="reduction"):
        denoising_error(predicted, noise, reduction="median")


def test_the_hand_schedule_numbers() -> None:
    """Guard on the hand computation itself: ᾱ of the 4-step schedule, written out."""
    assert math.prod([0.9, 0.8, 0.7, 0.6]) == pytest.approx(0.3024, rel=1e-12)
