"""``SFDModule``: Score Forgetting Distillation into a one-step generator (docs/method.md §6).

Three copies of a label-conditional teacher: the teacher f_φ (frozen), a fake-score network
f_ψ and the one-step generator G_θ. Each training step takes one fake-score step (denoising
score matching on generator samples) and one generator step (Score identity Distillation),
with two optimizers under Lightning's manual optimisation. Forgotten labels c_f are mapped
onto override labels c_o in the teacher's eyes, so G_θ(z, c_f) learns to draw what the
teacher draws for c_o. No real image is used: the training batches only pace the steps.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy
import torch
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from vdu_lightning.checkpoints import load_diffusion_model
from vdu_lightning.modules.compat import check_precision
from vdu_lightning.diffusion import noised, predict_noise, sample_shape, update_ema
from vdu_lightning.evaluation.classifier import ClassifierNet, load_classifier
from vdu_lightning.losses import check_choice
from vdu_lightning.modules.frozen import FrozenNetworks
from vdu_lightning.modules.noise import NoiseStreams, NoiseStreamsHooks
from vdu_lightning.methods.sfd import OneStepGeneratorPipeline, one_step_images
from vdu_lightning.methods.sfd.score_distillation import (
    fake_score_loss,
    sid_generator_loss,
    x0_from_epsilon,
)
from vdu_lightning.model_card import ExportCard, model_card

OVERRIDES = ("fixed", "random", "classifier")


class SFDModule(NoiseStreamsHooks, pl.LightningModule):
    """Distil a label-conditional DDPM into a one-step generator that forgets ``forget_classes``.

    With ``forget_classes=[]`` it is plain Score identity Distillation (SiD): every label is
    distilled as the teacher draws it.

    Args:
        teacher: a label-conditional diffusers directory (or its Hub ID) or a
            ``DiffusionModule`` checkpoint.
        forget_classes: labels whose images the generator must stop drawing (none: SiD).
        weights: ``ema`` or ``raw`` weights of a ``DiffusionModule`` checkpoint.
        override: ``fixed`` (every c_f becomes ``override_class``), ``random`` (a retained
            label drawn per sample) or ``classifier`` (the retained label that ``classifier``
            finds likeliest in the generator's own sample: the nearest safe class).
        override_class: the label of ``fixed``.
        classifier: a ``ClassifierModule`` directory, for ``override="classifier"``.
        alpha: α of the generator loss.
        retain_weight: a_r = b_r, the weight of the retained labels' terms.
        forget_weight: a_f = b_f, the weight of the forget terms. Each group's terms are
            averaged over its own samples (as if retained and forgotten labels came in batches
            of their own, as in the reference), then weighted.
        forget_warmup_steps: iterations over which the forget weight ramps up from 0.
        t_min, t_max: the range of t of both steps (on the teacher's 0..T−1).
        t_init: the generator's fixed time: G(z, c) = f_θ(√(1 − ᾱ)·z, t_init, c).
        lr, betas: Adam's, for both networks.
        grad_clip: clip each gradient by value (0: none).
        ema_decay: decay of the generator's EMA, warmed up as min(decay, (1 + n)/(10 + n))
            at iteration n, so that a short run does not export mostly the teacher.
        batch_size: generator samples per iteration; ``steps_per_epoch``: iterations of an
            epoch.

    Each iteration steps both optimizers, and Lightning counts every optimizer step: the
    trainer's ``max_steps`` is twice the number of iterations.
    """

    def __init__(
        self,
        teacher: str,
        forget_classes: Sequence[int],
        weights: str = "ema",
        override: str = "random",
        override_class: int | None = None,
        classifier: str | None = None,
        alpha: float = 1.2,
        retain_weight: float = 1.0,
        forget_weight: float = 0.01,
        forget_warmup_steps: int = 0,
        t_min: int = 38,
        t_max: int = 712,
        t_init: int = 440,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.0, 0.999),
        grad_clip: float = 1.0,
        ema_decay: float = 0.999,
        batch_size: int = 64,
        steps_per_epoch: int = 1000,
    ) -> None:
        super().__init__()
        check_choice("override", override, OVERRIDES)
        self.save_hyperparameters()
        self.automatic_optimization = False
        unet, self.scheduler, num_classes = load_diffusion_model(teacher, weights)
        if num_classes is None:
            raise ValueError(f"SFD needs a label-conditional teacher; {teacher} is unconditional")
        if self.scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"SFD needs an epsilon-predicting teacher; {teacher} predicts "
                             f"{self.scheduler.config.prediction_type}")
        forget = sorted(set(forget_classes))
        if any(not 0 <= c < num_classes for c in forget) or len(forget) == num_classes:
            raise ValueError(f"forget_classes must be labels in 0..{num_classes - 1}, not all "
                             f"of them, got {list(forget_classes)}")
        self.retained = [c for c in range(num_classes) if c not in forget]
        if override == "fixed" and override_class not in self.retained:
            raise ValueError(f"override='fixed' needs override_class among the retained "
                             f"labels {self.retained}, got {override_class!r}")
        if (override == "classifier") != (classifier is not None):
            raise ValueError("give classifier (a ClassifierModule directory) exactly when "
                             f"override='classifier'; got override={override!r}, "
                             f"classifier={classifier!r}")
        num_timesteps = len(self.scheduler.alphas_cumprod)
        if not 0 <= t_min < t_max <= num_timesteps or not 0 <= t_init < num_timesteps:
            raise ValueError(f"need 0 <= t_min < t_max <= {num_timesteps} and 0 <= t_init < "
                             f"{num_timesteps}, got {t_min}, {t_max}, {t_init}")
        self.forget = forget
        self.num_classes = num_classes
        unet.train()
        self.generator = unet
        self.fake_score = copy.deepcopy(unet)
        self.ema_generator = copy.deepcopy(unet).requires_grad_(False)
        # The teacher never trains: outside the children (``FrozenNetworks``).
        self.frozen = FrozenNetworks()
        self.frozen.add("teacher", copy.deepcopy(unet))
        self.noise = NoiseStreams()

    @property
    def teacher(self) -> nn.Module:
        return self.frozen.get("teacher", self.device)

    def override_classifier(self) -> ClassifierNet | None:
        """The ``classifier`` override's classifier (frozen, outside the children), loaded on
        first use, so that a bad directory is named at setup and a module built in Python
        costs nothing until it trains."""
        path = self.hparams.classifier
        if path is None:
            return None
        if "classifier" not in self.frozen:
            loaded = load_classifier(path)
            if loaded.num_classes != self.num_classes:
                raise ValueError(f"the classifier {path} tells {loaded.num_classes} "
                                 f"classes apart; the teacher has {self.num_classes} labels")
            self.frozen.add("classifier", loaded)
        return self.frozen.get("classifier", self.device)

    # ---- sampling ---------------------------------------------------------------------------
    def x0(self, network: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
           labels: torch.Tensor) -> torch.Tensor:
        """The network's x_0-prediction f(x_t, t, c)."""
        epsilon = predict_noise(network, x_t, t, labels)
        return x0_from_epsilon(x_t, epsilon, self.scheduler.alphas_cumprod, t)

    def generate(self, z: torch.Tensor, labels: torch.Tensor, ema: bool = False) -> torch.Tensor:
        """One-step images x_g = f_θ(√(1 − ᾱ_init)·z, t_init, c) (the EMA generator's with
        ``ema``)."""
        return one_step_images(self.ema_generator if ema else self.generator,
                               self.scheduler.alphas_cumprod, self.hparams.t_init, z, labels)

    def pipeline(self, ema: bool = True) -> OneStepGeneratorPipeline:
        """The (EMA) generator as a ``OneStepGeneratorPipeline`` (sharing its weights)."""
        return OneStepGeneratorPipeline(self.ema_generator if ema else self.generator,
                                        self.scheduler, self.hparams.t_init)

    def save_pretrained(self, path: str | os.PathLike, card: ExportCard | None = None) -> None:
        """Write the EMA generator as a ``OneStepGeneratorPipeline`` directory with a README
        card (``card`` or ``model_card()``), atomically."""
        self.pipeline().save_atomically(path, card or self.model_card(where=str(path)))

    def model_card(self, forget_set: str | None = None, evaluation: dict | None = None,
                   picture: str | os.PathLike | None = None, where: str = "path/to/this/folder"
                   ) -> ExportCard:
        """The README card of this model's export (see ``vdu_lightning.model_card``)."""
        return model_card(type(self).__name__, "OneStepGeneratorPipeline", self.hparams,
                          self.hparams.teacher, forget_set, evaluation, picture, where)

    # ---- the labels of a step -----------------------------------------------------------------
    def draw_labels(self, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the generator's labels c, forget mask) of one iteration: uniform labels, so about
        one sample in ``num_classes`` per forgotten label has one."""
        labels = torch.randint(0, self.num_classes, (self.hparams.batch_size,),
                               device=self.device, generator=generator)
        return labels, torch.isin(labels, torch.tensor(self.forget, device=self.device))

    def teacher_labels(self, labels: torch.Tensor, forget: torch.Tensor, samples: torch.Tensor,
                       generator: torch.Generator | None) -> torch.Tensor:
        """The labels the teacher sees: c for retained samples, the override c_o for
        forgotten ones (``samples``, the generator's images, are read by ``classifier``)."""
        retained = torch.tensor(self.retained, device=labels.device)
        if self.hparams.override == "fixed":
            override = torch.full_like(labels, self.hparams.override_class)
        elif self.hparams.override == "random":
            override = retained[torch.randint(0, len(retained), labels.shape,
                                              device=labels.device, generator=generator)]
        else:
            with torch.no_grad():
                logits = self.override_classifier().eval()(samples.clamp(-1, 1))
            override = retained[logits[:, retained].argmax(dim=1)]
        return torch.where(forget, override, labels)

    @property
    def iteration(self) -> int:
        """Iterations done: Lightning counts both optimizers' steps in ``global_step``."""
        return self.global_step // 2

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
        self.override_classifier()  # loaded and checked before any step
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1:
            # Each backward pass reaches one network only; DDP all-reduces every parameter
            # it wraps per backward, so the other network's must be found unused.
            if not isinstance(strategy, DDPStrategy):
                raise NotImplementedError(
                    f"SFDModule runs in one process or under DDP; got "
                    f"{type(strategy).__name__} with world size {self.trainer.world_size}")
            if not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"):
                raise ValueError(
                    "SFDModule under DDP needs find_unused_parameters=True (each of its two "
                    "backward passes reaches one network): use "
                    "--trainer.strategy=ddp_find_unused_parameters_true, or "
                    "DDPStrategy(find_unused_parameters=True)")

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        fake_optimizer, generator_optimizer = self.optimizers()
        rng = self.noise.generator
        labels, forget = self.draw_labels(rng)
        weights = self.term_weights(forget)
        z = torch.randn(labels.shape[0], *self.sample_shape, device=self.device, generator=rng)

        # Fake-score step: denoising score matching on the generator's samples (held fixed).
        with torch.no_grad():
            samples = self.generate(z, labels)
        x_t, noise, t = self.noised(samples, rng)
        fake_loss = fake_score_loss(predict_noise(self.fake_score, x_t, t, labels), noise,
                                    weights)
        self._step(fake_optimizer, fake_loss, "fake-score")

        # Generator step on fresh samples (as the reference: not those the fake score has just
        # fitted): SiD through the teacher (c_o for forgotten labels) and the fake score.
        z = torch.randn(z.shape, device=self.device, generator=rng)
        samples = self.generate(z, labels)
        teacher_labels = self.teacher_labels(labels, forget, samples.detach(), rng)
        self.fake_score.requires_grad_(False)
        x_t, _, t = self.noised(samples, rng)
        generator_loss = sid_generator_loss(self.x0(self.teacher, x_t, t, teacher_labels),
                                            self.x0(self.fake_score, x_t, t, labels), samples,
                                            self.hparams.alpha, weights)
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

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return sample_shape(self.generator)

    @override
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        kwargs = {"lr": self.hparams.lr, "betas": tuple(self.hparams.betas)}
        return [torch.optim.Adam(self.fake_score.parameters(), **kwargs),
                torch.optim.Adam(self.generator.parameters(), **kwargs)]

    @override
    def train_dataloader(self) -> DataLoader:
        # SFD needs no data: one item per step paces the epoch.
        return DataLoader(range(self.hparams.steps_per_epoch), batch_size=1)
