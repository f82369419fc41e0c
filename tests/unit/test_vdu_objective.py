"""The VDU objective is the right one: a conjugate Gaussian model where p(θ | D_r) is known.

x ~ N(θ, s²) per coordinate, prior N(m0, v0), data D = D_r ∪ D_f. With the exact posterior
p(θ | D) = N(m_D, v_D) as the prior and the exact log-likelihood of D_f as the plasticity
term, L = ½·S + ½·P (summed terms) is −½ log p(θ | D_r) + const, so VDUModule's own training
loop must end at the exact mean of p(θ | D_r). Only ``load_model`` and ``plasticity_loss`` are
swapped; the prior file, CheckpointPrior, the fused stability term, training_step and the
optimizer are the ones the diffusion case uses.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from vdu_lightning import ParameterPrior, VDUModule
from vdu_lightning.callbacks import CheckpointPrior, UnlearningGuard
from vdu_lightning.diffusion import build_scheduler

NOISE_STD = 1.0
PRIOR_MEAN, PRIOR_VAR = 0.0, 1.0


class GaussianMean(nn.Module):
    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(start.clone())


class GaussianVDU(VDUModule):
    """VDU where the 'network' is θ and the likelihood is exactly Gaussian."""

    def __init__(self, start: torch.Tensor, **kwargs) -> None:
        self.start = start
        super().__init__(pretrained="(the Gaussian posterior mean)", **kwargs)

    def load_model(self):
        return GaussianMean(self.start), build_scheduler(num_train_timesteps=10), None

    def plasticity_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        likelihood = torch.distributions.Normal(self.unet.theta, NOISE_STD)
        return likelihood.log_prob(batch["image"]).sum()


def _posterior(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact N(m, v) of θ given data [n, dim] (float64)."""
    precision = 1.0 / PRIOR_VAR + data.shape[0] / NOISE_STD**2
    mean = (PRIOR_MEAN / PRIOR_VAR + data.sum(0) / NOISE_STD**2) / precision
    return mean, torch.full_like(mean, 1.0 / precision)


def test_vdu_with_half_gamma_and_summed_terms_finds_the_exact_retain_posterior_mean(
    tmp_path,
) -> None:
    generator = torch.Generator().manual_seed(0)
    retain = 2.0 + torch.randn(20, 3, generator=generator, dtype=torch.float64)
    forget = torch.tensor([4.0, -1.0, -0.5], dtype=torch.float64) + torch.randn(
        10, 3, generator=generator, dtype=torch.float64)
    mean_d, var_d = _posterior(torch.cat([retain, forget]))
    mean_r, _ = _posterior(retain)

    prior = ParameterPrior({"theta": mean_d.float()}, {"theta": var_d.float()}, count=2,
                           source="independent")
    prior.save(tmp_path / "posterior.safetensors")
    module = GaussianVDU(mean_d.float(), gamma=0.5, reduction="sum", optimizer="sgd", lr=0.05)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=200, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[CheckpointPrior(prior=str(tmp_path / "posterior.safetensors")),
                   UnlearningGuard()],
    )
    # Full batch: every step sees all of D_f, so the loss is exactly L_VDU.
    batches = DataLoader([{"image": forget.float()}] * 200, batch_size=None)
    trainer.fit(module, train_dataloaders=batches)

    theta = module.unet.theta.detach().double()
    assert torch.allclose(theta, mean_r, atol=1e-4), (theta, mean_r)
    # The test can tell the right answer from the nearby wrong ones.
    assert (theta - mean_d).abs().min() > 0.05
    assert (theta - retain.mean(0)).abs().min() > 0.05
    assert trainer.global_step == 200


def test_other_gammas_and_mean_reduction_end_elsewhere(tmp_path) -> None:
    """γ = ½ with summed terms is the Bayesian answer; other settings must not land there."""
    generator = torch.Generator().manual_seed(1)
    retain = 2.0 + torch.randn(20, 3, generator=generator, dtype=torch.float64)
    forget = 3.0 + torch.randn(10, 3, generator=generator, dtype=torch.float64)
    mean_d, var_d = _posterior(torch.cat([retain, forget]))
    mean_r, _ = _posterior(retain)
    prior = ParameterPrior({"theta": mean_d.float()}, {"theta": var_d.float()}, count=2,
                           source="independent")
    module = GaussianVDU(mean_d.float(), gamma=0.8, reduction="sum", optimizer="sgd", lr=0.02)
    module.set_prior(prior)
    trainer = pl.Trainer(accelerator="cpu", max_steps=300, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([{"image": forget.float()}] * 300,
                                                     batch_size=None))
    theta = module.unet.theta.detach().double()
    # γ = 0.8: stationary point of 0.8·S + 0.2·P, solved by hand.
    precision_s = 0.8 / var_d
    precision_p = 0.2 * forget.shape[0] / NOISE_STD**2
    expected = (precision_s * mean_d - 0.2 * forget.sum(0) / NOISE_STD**2) / (
        precision_s - precision_p)
    assert torch.allclose(theta, expected, atol=1e-4)
    assert (theta - mean_r).abs().min() > 0.05
