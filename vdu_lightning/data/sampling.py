"""``ResumableShuffle``: the training order of one process, fixed by (seed, epoch), resumable.

A ``DataLoader(shuffle=True)`` draws its order from the global RNG, which a resumed run does
not restore, and Lightning restarts an interrupted epoch from its first batch. Both make a
resumed run train on other batches than the run it continues. This sampler's order depends
only on the job's seed and the epoch (as Lightning's own ``DistributedSampler`` under DDP),
and a resumed run starts the interrupted epoch after the batches already trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


class ResumableShuffle(DistributedSampler):
    """This process's share of a data set, shuffled anew every epoch from ``seed + epoch``.

    Being a ``DistributedSampler``, it is kept as it is under DDP (Lightning only injects a
    sampler into loaders that have none of this kind), so one and several processes shard
    alike: rank r takes every ``num_replicas``-th item of the epoch's permutation (padded
    with repeats when the set does not divide evenly, as ``DistributedSampler`` does).

    Example:
        >>> sampler = ResumableShuffle(range(10), seed=0)
        >>> sampler.set_epoch(1)
        >>> order = list(sampler)
        >>> sampler.resume_at(batches=2, batch_size=3)
        >>> list(sampler) == order[6:]  # the rest of the epoch, then whole epochs again
        True
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed)
        self._skip = 0

    def resume_at(self, batches: int, batch_size: int, limit: int | float = 1.0) -> None:
        """Start the next iteration after ``batches`` batches of the current epoch (taken
        modulo the batches an epoch has, as an interrupted epoch may have ended there).

        ``limit`` is the trainer's ``limit_train_batches`` (a count or a fraction), which
        ends an epoch early: the epoch has that many batches, as Lightning counts them.
        """
        per_epoch = math.ceil(self.num_samples / batch_size)
        if isinstance(limit, int):
            per_epoch = min(per_epoch, limit)
        else:
            per_epoch = max(1, int(per_epoch * limit))
        self._skip = (batches % per_epoch) * batch_size

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])
