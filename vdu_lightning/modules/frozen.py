"""``FrozenNetworks``: the networks a LightningModule uses but never trains.

The original model (to sample from, or to bound the forget error), SFD's teacher, a text-to-
image pipeline's VAE and text encoder. As children of the module they would be checkpointed,
given to DDP (which would all-reduce and broadcast them), cast by precision plugins and
sharded; held here they are none of that, and each follows the module to its device when
asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class FrozenNetworks:
    """Networks held outside a module's children, frozen (no gradient, eval mode).

    Example:
        >>> frozen = FrozenNetworks()
        >>> teacher = frozen.add("teacher", nn.Linear(2, 2))
        >>> teacher.weight.requires_grad, teacher.training, "teacher" in frozen
        (False, False, True)
    """

    def __init__(self) -> None:
        self._networks: dict[str, nn.Module] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._networks

    def add(self, name: str, network: nn.Module) -> nn.Module:
        """Hold ``network`` as ``name``, frozen; returns it."""
        self._networks[name] = network.requires_grad_(False).eval()
        return self._networks[name]

    def get(self, name: str, device: torch.device | str | None = None,
            load: Callable[[], nn.Module] | None = None) -> nn.Module:
        """The network ``name`` on ``device``; built by ``load`` on first use if given."""
        if name not in self._networks:
            if load is None:
                raise KeyError(f"no frozen network named {name!r}")
            self.add(name, load())
        network = self._networks[name]
        return network if device is None else network.to(device)
