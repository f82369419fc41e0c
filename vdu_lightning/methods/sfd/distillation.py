"""``ScoreDistillationModule``: what SFD on class labels and SFD on prompts share.

Three copies of the teacher's denoiser: the teacher f_φ (frozen), a fake-score network f_ψ and
the one-step generator G_θ (with an EMA copy). Each training iteration takes one fake-score
step (denoising score matching on generator samples) and one generator step (Score identity
Distillation), with two optimizers under Lightning's manual optimisation. Forgotten
conditions c_f are replaced by override conditions c_o in the teacher's eyes only, so
G_θ(z, c_f) learns to draw what the teacher draws for c_o (docs/method.md §6). No image is
read: the training batches only pace the iterations.

A subclass says what a condition is (a label, a prompt's index) through four hooks:
``draw_conditions``, ``teacher_conditions``, ``predict`` and ``generate``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from vdu_lightning.diffusion import noised, update_ema
from vdu_lightning.methods.sfd.score_distillation import (
    fake_score_loss,
    sid_generator_loss,
    x0_from_epsilon,
)
from vdu_lightning.modules.compat import check_precision
from vdu_lightning.modules.frozen import FrozenNetworks
from vdu_lightning.modules.noise import NoiseStreams, NoiseStreamsHooks


class ScoreDistillationModule(NoiseStreamsHooks, pl.LightningModule, ABC):
    """Base of the SFD modules. A subclass's ``__init__`` takes (and saves as hyperparameters)
    ``alpha``, ``retain_weight``, ``forget_weight``, ``forget_warmup_steps``, ``t_min``,
    ``t_max``, ``t_init``, ``lr``, ``betas``, ``grad_clip``, ``ema_decay``, ``batch_size`` and
    ``steps_per_epoch`` (see ``SFDModule``), then calls ``distil(unet, scheduler)``.

    Each iteration steps both optimizers, and Lightning counts every optimizer step: the
    trainer's ``max_steps`` is twice the number of iterations.
    """

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.frozen = FrozenNetworks()
        self.noise = NoiseStreams()

    def distil(self, unet: nn.Module, scheduler: Any) -> None:
        """Distil ``unet`` (an ε-predicting teacher whose forward process is ``scheduler``):
        the generator, the fake score and the EMA generator start as copies of it."""
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"SFD needs an epsilon-predicting teacher; this one predicts "
                             f"{scheduler.config.prediction_type}")
        hp = self.hparams
        num_timesteps = len(scheduler.alphas_cumprod)
        if not 0 <= hp.t_min < hp.t_max <= num_timesteps or not 0 <= hp.t_init < num_timesteps:
            raise ValueError(f"need 0 <= t_min < t_max <= {num_timesteps} and 0 <= t_init < "
                             f"{num_timesteps}, got {hp.t_min}, {hp.t_max}, {hp.t_init}")
        self.scheduler = scheduler
        unet.train()
        self.generator = unet
        self.fake_score = copy.deepcopy(unet)
        self.ema_generator = copy.deepcopy(unet).requires_grad_(False)
        # The teacher never trains: outside the children (``FrozenNetworks``).
        self.frozen.add("teacher", copy.deepcopy(unet))

    # ---- what a subclass defines -----------------------------------------------------------
    @abstractmethod
    def draw_conditions(self, generator: torch.Generator | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the generator's conditions c of one iteration, its forget mask)."""

    @abstractmethod
    def teacher_conditions(self, conditions: torch.Tensor, forget: torch.Tensor,
                           samples: torch.Tensor, generator: torch.Generator | None
                           ) -> torch.Tensor:
        """The conditions the teacher sees: c, with the override c_o where ``forget``."""

    @abstractmethod
    def predict(self, network: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                conditions: torch.Tensor, teacher: bool = False) -> torch.Tensor:
        """The ε-prediction of ``network`` (``teacher``: it is the teacher)."""

    @abstractmethod
    def generate(self, z: torch.Tensor, conditions: torch.Tensor,
                 ema: bool = False) -> torch.Tensor:
        """The (EMA) generator's one-step samples for noise ``z``."""

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the generator's samples."""

    # ---- the pieces of an iteration ----------------------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        return self.frozen.get("teacher", self.device)

    @property
    def iteration(self) -> int:
        """Iterations done: Lightning counts both optimizers' steps in ``global_step``."""
        return self.global_step // 2

    def x0(self, network: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
           conditions: torch.Tensor, teacher: bool = False) -> torch.Tensor:
        """The network's x_0-prediction f(x_t, t, c)."""
        epsilon = self.predict(network, x_t, t, conditions, teacher)
        return x0_from_epsilon(x_t, epsilon, self.scheduler.alphas_cumprod, t)

    def term_weights(self, forget: torch.Tensor) -> torch.Tensor:
        """Per-sample weights whose batch mean of w·ℓ is a_r·mean_retained(ℓ) +
        a_f·mean_forgotten(ℓ), with a_f warmed up: each group counts as a batch of its own."""
        warmup = self.hparams.forget_warmup_steps
        ramp = min(1.0, self.iteration / warmup) if warmup > 0 else 1.0
        size = forget.numel()
        forgotten = int(forget.sum())
        return torch.where(forget, self.hparams.forget_weight * ramp * size / max(forgotten, 1),
                           self.hparams.retain_weight * size / max(size - forgotten, 1))

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, ε, t) with t in SFD's band t_min..t_max−1."""
        return noised(self.scheduler, x0, generator, (self.hparams.t_min, self.hparams.t_max))

    # ---- training ---------------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        check_precision(self.trainer, type(self).__name__)
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1:
            # Each backward pass reaches one network only; DDP all-reduces every parameter
            # it wraps per backward, so the other network's must be found unused.
            if not isinstance(strategy, DDPStrategy):
                raise NotImplementedError(
                    f"{type(self).__name__} runs in one process or under DDP; got "
                    f"{type(strategy).__name__} with world size {self.trainer.world_size}")
            if not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"):
                raise ValueError(
                    f"{type(self).__name__} under DDP needs find_unused_parameters=True (each "
                    "of its two backward passes reaches one network): use "
                    "--trainer.strategy=ddp_find_unused_parameters_true, or "
                    "DDPStrategy(find_unused_parameters=True)")

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        fake_optimizer, generator_optimizer = self.optimizers()
        rng = self.noise.generator
        conditions, forget = self.draw_conditions(rng)
        weights = self.term_weights(forget)
        z = torch.randn(forget.shape[0], *self.sample_shape, device=self.device, generator=rng)

        # Fake-score step: denoising score matching on the generator's samples (held fixed).
        with torch.no_grad():
            samples = self.generate(z, conditions)
        x_t, noise, t = self.noised(samples, rng)
        fake_loss = fake_score_loss(self.predict(self.fake_score, x_t, t, conditions), noise,
                                    weights)
        self._step(fake_optimizer, fake_loss, "fake-score")

        # Generator step on fresh samples (as the reference: not those the fake score has just
        # fitted): SiD through the teacher (c_o for forgotten conditions) and the fake score.
        z = torch.randn(z.shape, device=self.device, generator=rng)
        samples = self.generate(z, conditions)
        teacher_conditions = self.teacher_conditions(conditions, forget, samples.detach(), rng)
        self.fake_score.requires_grad_(False)
        x_t, _, t = self.noised(samples, rng)
        generator_loss = sid_generator_loss(
            self.x0(self.teacher, x_t, t, teacher_conditions, teacher=True),
            self.x0(self.fake_score, x_t, t, conditions), samples, self.hparams.alpha, weights)
        self._step(generator_optimizer, generator_loss, "generator")
        self.fake_score.requires_grad_(True)
        self.update_ema()
        self.log_dict({"train/fake_score_loss": fake_loss, "train/generator_loss": generator_loss},
                      prog_bar=True)

    def _step(self, optimizer: Any, loss: torch.Tensor, name: str) -> None:
        if not torch.isfinite(loss):
            # Stop before the step: the last checkpoint still holds finite weights.
            raise FloatingPointError(f"SFD's {name} loss is {loss.item()} at iteration "
                                     f"{self.iteration}; lower lr or check the teacher")
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    @override
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Here, not after manual_backward: under 16-mixed the gradients are unscaled by now.
        if self.hparams.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip,
                                gradient_clip_algorithm="value")

    def update_ema(self) -> None:
        """The EMA generator follows the step just taken (``diffusion.update_ema``)."""
        update_ema(self.ema_generator, self.generator, self.hparams.ema_decay, self.iteration)

    @override
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        kwargs = {"lr": self.hparams.lr, "betas": tuple(self.hparams.betas)}
        return [torch.optim.Adam(self.fake_score.parameters(), **kwargs),
                torch.optim.Adam(self.generator.parameters(), **kwargs)]

    @override
    def train_dataloader(self) -> DataLoader:
        # SFD needs no data: one item per step paces the epoch.
        return DataLoader(range(self.hparams.steps_per_epoch), batch_size=1)
