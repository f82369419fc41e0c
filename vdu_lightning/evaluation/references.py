"""The real images an evaluation compares with, read from a datamodule (``load(split)``,
``forget_classes``, ``retain_classes``, and the held-out ``forget_eval_set`` and
``retain_eval_set`` of ``ForgetSetDataModule``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def retained_reference(data: Any, split: str = "train", num: int | None = None,
                       seed: int = 0) -> Tensor:
    """The real images of the retained classes in ``split`` (a seeded subset of ``num`` when
    there are more): u-FID's real side."""
    dataset = data.load(split)
    if not hasattr(dataset, "labels"):
        raise TypeError(f"the {split!r} split must have a .labels tensor to pick its "
                        "retained-class images")
    retain = torch.tensor(list(data.retain_classes or []), dtype=torch.int64)
    members = torch.nonzero(torch.isin(torch.as_tensor(dataset.labels), retain)).flatten()
    if len(members) < 2:
        raise ValueError(f"the {split!r} split has {len(members)} images of the retained "
                         f"classes {retain.tolist()}; FID needs at least 2")
    if num is not None and num < len(members):
        chosen = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed))
        members = torch.sort(members[chosen[:num]]).values
    return torch.stack([dataset[int(i)]["image"] for i in members])


def held_out_parts(data: Any) -> dict[str, tuple[Tensor, Tensor]] | None:
    """(images, labels) of the datamodule's held-out ``forget`` and ``retain`` parts, or None
    when it has none. Images neither the model nor the unlearning trained on, except that a
    forget set the user gave as a folder or data set is its own forget part."""
    if not all(hasattr(data, f"{part}_eval_set") for part in ("forget", "retain")):
        return None
    parts = {}
    for part in ("forget", "retain"):
        items = [item for item in getattr(data, f"{part}_eval_set")]
        parts[part] = (torch.stack([item["image"] for item in items]),
                       torch.tensor([int(item.get("label", -1)) for item in items]))
    return parts
