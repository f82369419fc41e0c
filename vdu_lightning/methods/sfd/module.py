"""``SFDModule``: Score Forgetting Distillation of a label-conditional DDPM into a one-step
generator (docs/method.md §6). The iteration itself is ``ScoreDistillationModule``'s; here a
condition is a class label, and a forgotten label's override is fixed, random or the
classifier's pseudo-label.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from typing_extensions import override

from vdu_lightning.checkpoints import load_diffusion_model
from vdu_lightning.diffusion import predict_noise, sample_shape
from vdu_lightning.evaluation.classifier import ClassifierNet, load_classifier
from vdu_lightning.losses import check_choice
from vdu_lightning.methods.sfd.distillation import ScoreDistillationModule
from vdu_lightning.methods.sfd.one_step import OneStepGeneratorPipeline, one_step_images
from vdu_lightning.model_card import ExportCard, model_card

OVERRIDES = ("fixed", "random", "classifier")


class SFDModule(ScoreDistillationModule):
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
    trainer's ``max_steps`` is twice the number of iterations (``ScoreDistillationModule``).
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
        unet, scheduler, num_classes = load_diffusion_model(teacher, weights)
        if num_classes is None:
            raise ValueError(f"SFD needs a label-conditional teacher; {teacher} is unconditional")
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
        self.forget = forget
        self.num_classes = num_classes
        self.distil(unet, scheduler)

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
    @override
    def predict(self, network: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                conditions: torch.Tensor, teacher: bool = False) -> torch.Tensor:
        return predict_noise(network, x_t, t, conditions)

    @override
    def generate(self, z: torch.Tensor, labels: torch.Tensor, ema: bool = False) -> torch.Tensor:
        """One-step images x_g = f_θ(√(1 − ᾱ_init)·z, t_init, c) (the EMA generator's with
        ``ema``)."""
        return one_step_images(self.ema_generator if ema else self.generator,
                               self.scheduler.alphas_cumprod, self.hparams.t_init, z,
                               labels=labels)

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
    @override
    def draw_conditions(self, generator: torch.Generator | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the generator's labels c, forget mask) of one iteration: uniform labels, so about
        one sample in ``num_classes`` per forgotten label has one."""
        labels = torch.randint(0, self.num_classes, (self.hparams.batch_size,),
                               device=self.device, generator=generator)
        return labels, torch.isin(labels, torch.tensor(self.forget, device=self.device))

    @override
    def teacher_conditions(self, labels: torch.Tensor, forget: torch.Tensor,
                           samples: torch.Tensor, generator: torch.Generator | None
                           ) -> torch.Tensor:
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
    @override
    def sample_shape(self) -> tuple[int, int, int]:
        return sample_shape(self.generator)

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.override_classifier()  # loaded and checked before any step
