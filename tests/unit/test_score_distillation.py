"""SFD's loss terms (docs/method.md §6) against hand computations on tiny tensors."""

from __future__ import annotations

import torch

from vdu_lightning.methods.sfd.score_distillation import (
    fake_score_loss,
    sid_generator_loss,
    x0_from_epsilon,
)


def test_x0_from_epsilon_inverts_add_noise() -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=100)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 4, 4, generator=generator), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 50, 99])
    x_t = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(x0_from_epsilon(x_t, noise, scheduler.alphas_cumprod, t), x0,
                               rtol=1e-4, atol=1e-4)


def test_the_generator_loss_matches_a_hand_computation_with_its_signs() -> None:
    f_phi = torch.tensor([[[[1.0, 2.0]]], [[[0.5, -1.0]]]])
    f_psi = torch.tensor([[[[0.0, 1.0]]], [[[0.5, 0.0]]]])
    x_g = torch.tensor([[[[0.0, 0.0]]], [[[1.0, -2.0]]]])
    alpha = 1.2
    # Sample 0: gap (1, 1), f_phi − x_g (1, 2), ω = 1.5: (1·(1 − 1.2) + 1·(2 − 1.2)) / 1.5
    first = (1 * (1 - 1.2) + 1 * (2 - 1.2)) / 1.5
    # Sample 1: gap (0, −1), f_phi − x_g (−0.5, 1), ω = 0.75: (−1)·(1 − 1.2·(−1)) / 0.75
    second = (-1 * (1 + 1.2)) / 0.75
    expected = (first + second) / 2
    assert torch.isclose(sid_generator_loss(f_phi, f_psi, x_g, alpha), torch.tensor(expected))


def test_omega_carries_no_gradient() -> None:
    f_phi = torch.tensor([[1.0, 3.0]])
    f_psi = torch.tensor([[0.5, 1.0]])
    x_g = torch.tensor([[0.0, 1.0]], requires_grad=True)
    sid_generator_loss(f_phi, f_psi, x_g, alpha=1.2).backward()
    # With ω = mean|f_phi − x_g| = 1.5 held fixed, ∂ℓ/∂x_g = −(f_phi − f_psi) / ω.
    torch.testing.assert_close(x_g.grad, -(f_phi - f_psi) / 1.5)


def test_gradients_reach_the_generator_through_both_score_networks() -> None:
    x_g = torch.tensor([[0.2, -0.4]], requires_grad=True)
    teacher_x0, fake_x0 = 2.0 * x_g, -1.0 * x_g  # stand-ins for f(x_t(x_g))
    sid_generator_loss(teacher_x0, fake_x0, x_g, alpha=1.2).backward()
    by_hand = x_g.detach().clone().requires_grad_(True)
    omega = (2.0 * by_hand - by_hand).abs().mean().detach()
    gap = 2.0 * by_hand + by_hand
    ((gap * ((2.0 * by_hand - by_hand) - 1.2 * gap)).sum() / omega).backward()
    torch.testing.assert_close(x_g.grad, by_hand.grad)


def test_the_fake_score_loss_sums_pixels_and_averages_samples() -> None:
    predicted = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    noise = torch.tensor([[[[0.0, 0.0]]], [[[2.0, 1.0]]]])
    assert fake_score_loss(predicted, noise) == (1.0 + 5.0) / 2


def test_per_sample_weights_scale_each_term() -> None:
    predicted, noise = torch.ones(2, 1, 1, 2), torch.zeros(2, 1, 1, 2)
    assert fake_score_loss(predicted, noise, torch.tensor([1.0, 0.01])) == (2 + 0.02) / 2
    f_phi, f_psi, x_g = torch.ones(2, 2), torch.zeros(2, 2), torch.zeros(2, 2)
    weighted = sid_generator_loss(f_phi, f_psi, x_g, 1.2, torch.tensor([1.0, 0.0]))
    assert torch.isclose(weighted, sid_generator_loss(f_phi, f_psi, x_g, 1.2) / 2)
