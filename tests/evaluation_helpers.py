"""A tiny stand-in for VDUModule's sampling interface, shared by the evaluation tests."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from conftest import TINY_UNET
from vdu_lightning import ClassifierModule, DiffusionModule
from vdu_lightning.diffusion import ddim_sample


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every parameter away from its initial value (zero-initialised layers included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


class TinyUnlearner(pl.LightningModule):
    """Two real tiny DiffusionModules behind ``sample_shape``, ``sample_from``, ``unet``,
    ``original_unet`` and ``scheduler``, as VDUModule.

    ``same=True`` makes the unlearned model a copy of the original; ``num_classes`` makes both
    label-conditional (``conditional`` and the labels ``sample_from`` got are then recorded).
    """

    def __init__(self, same: bool = False, num_classes: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.num_classes = num_classes
        self.labels_seen: list[torch.Tensor] = []
        self.original = DiffusionModule(unet=dict(TINY_UNET), num_train_timesteps=100,
                                        num_classes=num_classes)
        perturb(self.original.ema_unet, seed=1)
        self.unlearned = copy.deepcopy(self.original)
        if not same:
            perturb(self.unlearned.ema_unet, seed=2)
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls = {"original": 0, "unlearned": 0}

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.original.sample_shape

    @property
    def unet(self) -> torch.nn.Module:
        return self.unlearned.ema_unet

    @property
    def original_unet(self) -> torch.nn.Module:
        return self.original.ema_unet

    @property
    def scheduler(self) -> object:
        return self.original.scheduler

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @torch.no_grad()
    def sample_from(self, noise: torch.Tensor, original: bool = False,
                    num_steps: int | None = None, labels: torch.Tensor | None = None
                    ) -> torch.Tensor:
        self.calls["original" if original else "unlearned"] += 1
        if labels is not None:
            self.labels_seen.append(labels.clone())
        model = self.original if original else self.unlearned
        return ddim_sample(model.ema_unet.eval(), model.scheduler.config,
                           noise.to(self.device), num_steps=num_steps or 50,
                           class_labels=None if labels is None else labels.to(self.device))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.weight * batch["image"].mean()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.weight], lr=0.1)


def tiny_classifier(path: Path, seed: int = 0, in_channels: int = 1, num_classes: int = 10,
                    width: int = 8, architecture: str = "vgg") -> ClassifierModule:
    """A random classifier (10 classes of grey images, 32-d features by default) whose
    features spread, saved to ``path``."""
    torch.manual_seed(seed)
    classifier = ClassifierModule(in_channels=in_channels, num_classes=num_classes, width=width,
                                  architecture=architecture)
    with torch.no_grad():
        for module in classifier.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.fill_(0.1)
    classifier.save_pretrained(path)
    return ClassifierModule.from_pretrained(path)


class RecordingWandbLogger(WandbLogger):
    """A WandbLogger that starts no run: it records what it is asked to log."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir=save_dir, offline=True)
        self._root = save_dir
        self.images: list[dict] = []
        self.metrics: list[dict] = []

    @property
    def experiment(self) -> object:
        return object()

    @property
    def save_dir(self) -> str:
        return self._root

    @property
    def version(self) -> str:
        return "run0"

    def log_hyperparams(self, params: object) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.append(dict(metrics))

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs: object) -> None:
        self.images.append({"key": key, "images": images, "step": step, **kwargs})


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a busy CPU OpenMP's waiting for a
    descheduled second thread made these tests ~50× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
