"""FSDP2 plumbing for the prior penalty, in plain torch.

Under ``ModelParallelStrategy`` each parameter is a ``DTensor`` shard: the penalty is summed
over this rank's shard against the same slices of the prior, and the ranks' parts are then
added. These helpers keep that out of the LightningModules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor


def shard_layout(params: Sequence[torch.Tensor | None],
                 expected: Mapping[str, torch.Tensor]) -> tuple[Any, ...] | None:
    """(mesh, placements) shared by DTensor ``params`` (FSDP2), None for full tensors.

    ``expected`` maps each parameter's name (in order) to a tensor of its full shape (the
    prior's mean). Refused: a mix of sharded and full parameters, several layouts, and full
    parameters whose shape is not the expected one (FSDP1 shards outside their unit's
    forward, where the penalty cannot see them).
    """
    sharded = [isinstance(p, DTensor) for p in params]
    if any(sharded):
        layouts = {(p.device_mesh, tuple(p.placements)) for p in params
                   if isinstance(p, DTensor)}
        if not all(sharded) or len(layouts) > 1:
            raise RuntimeError("the stability term needs every parameter the prior covers "
                               "sharded alike by FSDP2 (one mesh, one placement): shard "
                               f"the whole network; found {len(layouts)} layout(s) and "
                               f"{sharded.count(False)} unsharded parameter(s)")
        return layouts.pop()
    hidden = [f"{n}: {None if p is None else tuple(p.shape)}, prior {tuple(full.shape)}"
              for (n, full), p in zip(expected.items(), params)
              if p is None or p.shape != full.shape]
    if hidden:
        raise RuntimeError(
            f"the stability term cannot see the full parameters it covers, e.g. "
            f"{hidden[:3]}: FSDPStrategy shards the parameters of submodules it wraps "
            "(auto_wrap_policy) outside their own forward, and use_orig_params=False hides "
            "them. Use FSDPStrategy without auto_wrap_policy, ModelParallelStrategy "
            "(FSDP2) or DDP; see docs/distributed.md"
        )
    return None


def local_slice(tensor: torch.Tensor, layout: tuple[Any, ...]) -> torch.Tensor:
    """This rank's slice of a full ``tensor``, cut exactly as a parameter of ``layout``.

    Every rank holds the same full tensor, so no data moves (``src_data_rank=None``);
    ``clone()`` keeps the slice alone, not the whole tensor it is cut from."""
    return distribute_tensor(tensor, *layout, src_data_rank=None).to_local().clone()


def sum_over_shards(local: torch.Tensor, layout: tuple[Any, ...] | None) -> torch.Tensor:
    """A sum over all ranks' parts from this rank's part ``local`` (unchanged for full
    tensors). Only the value crosses ranks: a shard's gradient is that of its own part,
    which no other rank's part depends on (FSDP2 reduce-scatters only the network's
    gradients)."""
    if layout is None:
        return local
    mesh, placements = layout
    # Partial over the mesh dimensions that shard, i.e. "the sum of the ranks' parts";
    # full_tensor() all-reduces it.
    parts = [Partial() if p.is_shard() else Replicate() for p in placements]
    total = DTensor.from_local(local.detach(), mesh, parts).full_tensor()
    return local + (total - local.detach())


def shard_unet(unet: nn.Module, mesh: Any, owner: str) -> None:
    """Shard a diffusers UNet with FSDP2 over the ``data_parallel`` dimension of ``mesh``:
    each block, then the rest; once (Lightning calls ``configure_model`` for every Trainer
    call). ``owner`` names the module in the error for a tensor-parallel mesh."""
    if isinstance(unet, FSDPModule):
        return
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(f"{owner} shards data-parallel only: use ModelParallelStrategy("
                         f"data_parallel_size={mesh.size()}, tensor_parallel_size=1)")
    data_parallel = mesh["data_parallel"]
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        if block is not None:
            fully_shard(block, mesh=data_parallel)
    fully_shard(unet, mesh=data_parallel)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
