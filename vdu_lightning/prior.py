"""``ParameterPrior``: the diagonal Gaussian N(μ*, diag σ*²) over parameters (docs/method.md §3).

μ* and σ*² are the per-parameter mean and variance over K checkpoints of the pre-trained
model, computed streaming (Welford's update, Chan's merge of partial results), so memory is
O(parameters) whatever K is. The prior is its own file: safetensors tensors (``mean.<name>``,
``var.<name>``) with JSON metadata in the safetensors header (names, shapes, dtypes, source,
K, min_var, floored entries). Nothing here is pickled, and no Lightning is imported.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vdu_lightning.checkpoints import read_unet_weights
from vdu_lightning.files import atomic_file
from vdu_lightning.hub import resolve_model, split_hub_id

#: Where the K checkpoints come from (docs/method.md §3); recorded in every prior file.
CHECKPOINT_SOURCES = ("independent", "trajectory", "finetune")
#: Also the priors of the peer methods: one constant variance (``isotropic``) and the
#: inverse of EWC's Fisher (``fisher``); no checkpoints behind them.
SOURCES = CHECKPOINT_SOURCES + ("isotropic", "fisher")
#: Floor of σ*²: a parameter that never moved would otherwise get an infinite precision.
#: 1e-8 is a standard deviation of 1e-4, below the step-to-step movement of Adam-trained
#: weights at the usual learning rates, so only (nearly) frozen entries hit it.
DEFAULT_MIN_VAR = 1e-8
_METADATA_KEY = "vdu_prior"
_FORMAT_VERSION = 1
#: What ``ParameterPrior.load`` reads from a prior file's header.
_HEADER_KEYS = ("names", "shapes", "dtypes", "count", "source", "min_var", "num_floored")
#: At most this many mismatches are listed in an error message.
_SHOWN = 5


def select_names(names: Iterable[str], include: Sequence[str] | None) -> list[str]:
    """The names matching any of the shell-style ``include`` patterns (all when None).

    Example:
        >>> select_names(["down.attn.w", "down.conv.w"], ["*attn*"])
        ['down.attn.w']
    """
    names = list(names)
    if include is None:
        return names
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]


def check_min_var(min_var: float, what: str = "min_var") -> float:
    """``min_var`` if it can floor a variance (positive and finite), else a ValueError.

    Checked before any checkpoint is read: NaN or a floor <= 0 would only show as an invalid
    variance once the prior is built.
    """
    if isinstance(min_var, bool) or not isinstance(min_var, (int, float)) or not (
            math.isfinite(min_var) and min_var > 0):
        raise ValueError(f"{what} must be a positive, finite variance floor (e.g. "
                         f"{DEFAULT_MIN_VAR:g}), got {min_var!r}")
    return float(min_var)


def _check_header(meta: Any) -> None:
    """Refuse a prior header that lacks a key ``load`` reads, or that covers no parameter."""
    missing = [key for key in _HEADER_KEYS if key not in meta]
    if missing:
        raise ValueError(f"its header lacks {missing} (a prior header has {list(_HEADER_KEYS)})")
    if not meta["names"]:
        # A prior over nothing would leave every parameter free: no stability term at all.
        raise ValueError("its header lists no parameter ('names' is empty): a prior covers at "
                         "least one")


def _floating(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Integer buffers (e.g. step counters) are not parameters of the Gaussian.
    return {k: v for k, v in tensors.items() if torch.is_floating_point(v)}


class RunningMoments:
    """Streaming count, mean and sum of squared deviations (M2) of named tensors.

    Accumulates on the CPU in float64: the K snapshots of one weight differ by far less than
    its value, and float64 keeps their mean and spread exact to float32 precision.

    Example:
        >>> moments = RunningMoments()
        >>> for value in (1.0, 2.0, 4.0):
        ...     moments.update({"w": torch.tensor([value])})
        >>> moments.count, moments.mean["w"].item(), (moments.m2["w"] / 2).item()
        (3, 2.3333333333333335, 2.333333333333333)
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}
        self.m2: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}

    def _check_same_tensors(self, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        missing = [n for n in self.mean if n not in tensors][:_SHOWN]
        extra = [n for n in tensors if n not in self.mean][:_SHOWN]
        reshaped = [f"{n}: {tuple(t.shape)} vs {self.shapes[n]}" for n, t in tensors.items()
                    if n in self.shapes and tuple(t.shape) != self.shapes[n]][:_SHOWN]
        if missing or extra or reshaped:
            raise ValueError(
                f"{what} does not match the earlier checkpoints: missing {missing}, "
                f"unexpected {extra}, other shapes {reshaped}"
            )

    def update(self, tensors: Mapping[str, torch.Tensor], what: str = "a snapshot") -> None:
        """Fold one snapshot in (Welford): mean += δ/n, M2 += δ·(x − mean_new)."""
        if self.count == 0:
            self.shapes = {n: tuple(t.shape) for n, t in tensors.items()}
            self.dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in tensors.items()}
            self.mean = {n: torch.zeros(s, dtype=torch.float64) for n, s in self.shapes.items()}
            self.m2 = {n: torch.zeros(s, dtype=torch.float64) for n, s in self.shapes.items()}
        else:
            self._check_same_tensors(tensors, what)
        self.count += 1
        for name, tensor in tensors.items():
            x = tensor.detach().to("cpu", torch.float64)
            delta = x - self.mean[name]
            self.mean[name].add_(delta, alpha=1.0 / self.count)
            self.m2[name].addcmul_(delta, x - self.mean[name])

    def merge(self, other: "RunningMoments") -> None:
        """Combine with moments of other snapshots (Chan et al.'s parallel update)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.load_state_dict(other.state_dict())
            self.mean = {n: t.clone() for n, t in other.mean.items()}
            self.m2 = {n: t.clone() for n, t in other.m2.items()}
            return
        self._check_same_tensors(other.mean, "the other part")
        n_a, n_b = self.count, other.count
        total = n_a + n_b
        for name in self.mean:
            delta = other.mean[name] - self.mean[name]
            self.mean[name].add_(delta, alpha=n_b / total)
            self.m2[name].add_(other.m2[name]).addcmul_(delta, delta, value=n_a * n_b / total)
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and values (checkpoint-safe with ``weights_only=True``)."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2,
                "shapes": {n: list(s) for n, s in self.shapes.items()}, "dtypes": self.dtypes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = {n: t.to(torch.float64) for n, t in state["mean"].items()}
        self.m2 = {n: t.to(torch.float64) for n, t in state["m2"].items()}
        self.shapes = {n: tuple(s) for n, s in state["shapes"].items()}
        self.dtypes = dict(state["dtypes"])

    def to_prior(self, source: str, min_var: float = DEFAULT_MIN_VAR) -> "ParameterPrior":
        """The prior: μ* = mean, σ*² = max(M2/(K−1), min_var) (unbiased, like torch.var)."""
        if self.count < 2:
            raise ValueError(f"a prior needs at least 2 checkpoints to estimate a variance, "
                             f"got {self.count}")
        var = {n: (m2 / (self.count - 1)).to(torch.float32) for n, m2 in self.m2.items()}
        floored = sum(int((v < min_var).sum()) for v in var.values())
        return ParameterPrior(
            mean={n: m.to(torch.float32) for n, m in self.mean.items()},
            var={n: v.clamp_min_(min_var) for n, v in var.items()},
            count=self.count, source=source, min_var=min_var, num_floored=floored,
            dtypes=self.dtypes,
        )


class ParameterPrior:
    """N(μ*, diag σ*²) over named parameters, with where it came from.

    Args:
        mean, var: float32 tensors by parameter name (var already floored).
        count: K, the number of checkpoints.
        source: ``independent``, ``trajectory`` or ``finetune``.
        min_var: the floor applied to var.
        num_floored: entries whose variance was below the floor.
        dtypes: the dtypes of the parameters in the checkpoints (recorded for the user).

    Example:
        >>> prior = ParameterPrior.from_tensors(
        ...     [{"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([2.0, 1.0])}], "trajectory")
        >>> prior.mean["w"].tolist(), prior.var["w"].tolist(), prior.num_floored
        ([1.0, 1.0], [2.0, 9.99999993922529e-09], 1)
    """

    def __init__(
        self,
        mean: Mapping[str, torch.Tensor],
        var: Mapping[str, torch.Tensor],
        count: int,
        source: str,
        min_var: float = DEFAULT_MIN_VAR,
        num_floored: int = 0,
        dtypes: Mapping[str, str] | None = None,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if list(mean) != list(var):
            raise ValueError("mean and var must cover the same parameters, in the same order")
        self.mean, self.var = dict(mean), dict(var)
        self.count, self.source, self.min_var = int(count), source, float(min_var)
        self.num_floored = int(num_floored)
        self.dtypes = dict(dtypes) if dtypes else {n: "float32" for n in self.mean}
        self._check_values()

    def _check_values(self) -> None:
        for name, var in self.var.items():
            if var.shape != self.mean[name].shape:
                raise ValueError(f"prior entry {name!r}: mean {tuple(self.mean[name].shape)} "
                                 f"and var {tuple(var.shape)} differ in shape")
            if not torch.isfinite(self.mean[name]).all():
                raise ValueError(f"prior mean of {name!r} holds NaN or inf")
            if not (torch.isfinite(var).all() and (var > 0).all()):
                raise ValueError(f"prior variance of {name!r} holds NaN, inf, zero or negative "
                                 "values: a variance must be positive and finite")

    # ---- building -----------------------------------------------------------------------
    @classmethod
    def from_tensors(
        cls,
        snapshots: Iterable[Mapping[str, torch.Tensor]],
        source: str,
        include: Sequence[str] | None = None,
        min_var: float = DEFAULT_MIN_VAR,
    ) -> "ParameterPrior":
        """The prior of snapshots given one after another (each can be dropped once read)."""
        check_min_var(min_var)
        moments = RunningMoments()
        index = 0
        for snapshot in snapshots:
            floating = _floating(snapshot)
            names = select_names(floating, include)
            if not names:
                raise ValueError(f"no parameter matches include={list(include or [])}: names "
                                 f"look like {list(floating)[:_SHOWN]}")
            moments.update({n: floating[n] for n in names}, f"snapshot {index}")
            # Drop this snapshot before the next is read: one checkpoint in memory at a time.
            del snapshot, floating
            index += 1
        return moments.to_prior(source, min_var)

    def restricted(self, include: Sequence[str]) -> "ParameterPrior":
        """This prior over the parameters matching the shell-style ``include`` patterns only
        (exact names match themselves); refused when none match.

        Example:
            >>> prior = ParameterPrior({"a.w": torch.zeros(2), "b.w": torch.zeros(1)},
            ...                        {"a.w": torch.ones(2), "b.w": torch.ones(1)}, 2,
            ...                        "trajectory")
            >>> prior.restricted(["a.*"]).names, prior.restricted(["a.*"]).numel
            (['a.w'], 2)
        """
        names = select_names(self.names, include)
        if not names:
            raise ValueError(f"no prior entry matches include={list(include)}: its names look "
                             f"like {self.names[:_SHOWN]}")
        floored = sum(int((self.var[n] <= self.min_var).sum()) for n in names)
        return ParameterPrior({n: self.mean[n] for n in names}, {n: self.var[n] for n in names},
                              self.count, self.source, self.min_var, floored,
                              {n: self.dtypes[n] for n in names})

    def recentred(self, weights: Mapping[str, torch.Tensor]) -> "ParameterPrior":
        """The same variances around ``weights`` (a model's named parameters): to forget again
        from an unlearned model, anchoring the stability term at what it has become rather
        than at the original.

        Example:
            >>> prior = ParameterPrior({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 2,
            ...                        "trajectory")
            >>> prior.recentred({"w": torch.tensor([1.0, 2.0])}).mean["w"].tolist()
            [1.0, 2.0]
        """
        self.check_matches(weights.items(), "the weights to centre on")
        return ParameterPrior({n: weights[n].detach().float().clone() for n in self.names},
                              self.var, self.count, self.source, self.min_var,
                              self.num_floored, self.dtypes)

    @classmethod
    def from_checkpoints(
        cls,
        paths: Sequence[str | os.PathLike],
        source: str = "trajectory",
        include: Sequence[str] | None = None,
        min_var: float = DEFAULT_MIN_VAR,
        weights: str = "ema",
        revision: str | None = None,
        subfolder: str | None = None,
    ) -> "ParameterPrior":
        """The prior of K checkpoint files or diffusers directories, read one at a time.

        Every name is checked (a local file exists; a Hub ID, ``owner/name`` as in
        ``vdu_lightning.hub``, is fetched into the cache) before any is read; then they are
        read one at a time, so that a lineage of large models never sits in memory at once.
        ``revision`` applies to Hub IDs, ``subfolder`` (e.g. ``unet`` of a Stable Diffusion
        repository) to every directory. See
        ``read_unet_weights`` for the accepted sources and ``weights``.
        """
        if source not in CHECKPOINT_SOURCES:
            raise ValueError(f"source must be one of {CHECKPOINT_SOURCES}, got {source!r}")
        if len(paths) < 2:
            raise ValueError(f"a prior needs at least 2 checkpoints, got {len(paths)}")
        missing = [str(p) for p in paths if not Path(p).exists() and split_hub_id(p) is None]
        if missing:
            raise FileNotFoundError(f"checkpoints not found: {missing}")
        local = [resolve_model(p, revision, subfolder) for p in paths]
        return cls.from_tensors((read_unet_weights(p, weights) for p in local), source,
                                include, min_var)

    # ---- matching a model ---------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.mean)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.mean.values())

    def check_matches(self, named_parameters: Iterable[tuple[str, torch.Tensor]],
                      model: str = "the model") -> None:
        """Raise ValueError naming the first parameters the prior covers but the model lacks
        or shapes differently. Parameters of the model outside the prior are allowed."""
        shapes = {name: tuple(p.shape) for name, p in named_parameters}
        missing = [n for n in self.mean if n not in shapes]
        reshaped = [f"{n}: prior {tuple(t.shape)}, model {shapes[n]}"
                    for n, t in self.mean.items() if n in shapes and tuple(t.shape) != shapes[n]]
        if missing or reshaped:
            raise ValueError(
                f"the prior ({self.count} {self.source} checkpoints, {len(self.mean)} tensors) "
                f"does not match {model}: "
                + (f"{len(missing)} prior tensors are not in the model, e.g. "
                   f"{missing[:_SHOWN]}" if missing else "")
                + ("; " if missing and reshaped else "")
                + (f"{len(reshaped)} have other shapes, e.g. {reshaped[:_SHOWN]}"
                   if reshaped else "")
                + ". Was the prior built from checkpoints of this model?"
            )

    def to(self, device: torch.device | str) -> "ParameterPrior":
        """This prior with its tensors on ``device`` (still float32)."""
        moved = {n: t.to(device, torch.float32) for n, t in self.mean.items()}
        return ParameterPrior(moved, {n: t.to(device, torch.float32) for n, t in self.var.items()},
                              self.count, self.source, self.min_var, self.num_floored, self.dtypes)

    # ---- files and checkpoints ----------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION, "source": self.source, "count": self.count,
            "min_var": self.min_var, "num_floored": self.num_floored, "names": self.names,
            "shapes": [list(t.shape) for t in self.mean.values()],
            "dtypes": [self.dtypes.get(n, "float32") for n in self.mean],
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and values, for a Lightning checkpoint (``weights_only`` loads it)."""
        return {"metadata": self.metadata(), "mean": self.mean, "var": self.var}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ParameterPrior":
        meta = state["metadata"]
        return cls(state["mean"], state["var"], meta["count"], meta["source"], meta["min_var"],
                   meta["num_floored"], dict(zip(meta["names"], meta["dtypes"])))

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file atomically (metadata as JSON in its header)."""
        tensors = {f"mean.{n}": t.detach().cpu().contiguous() for n, t in self.mean.items()}
        tensors.update({f"var.{n}": t.detach().cpu().contiguous() for n, t in self.var.items()})
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={_METADATA_KEY: json.dumps(self.metadata())})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ParameterPrior":
        """Read a file written by ``save``; refuses anything else with the reason."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prior file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = (handle.metadata() or {}).get(_METADATA_KEY)
                if header is None:
                    raise ValueError("no prior metadata in its header")
                meta = json.loads(header)
                _check_header(meta)
                mean = {n: handle.get_tensor(f"mean.{n}") for n in meta["names"]}
                var = {n: handle.get_tensor(f"var.{n}") for n in meta["names"]}
        except Exception as err:  # safetensors, json and key errors all mean "not a prior"
            raise ValueError(f"{path} is not a readable prior file (a safetensors file written "
                             f"by ParameterPrior.save / `vdu prior`): {err}") from err
        for name, shape in zip(meta["names"], meta["shapes"]):
            if list(mean[name].shape) != list(shape):
                raise ValueError(f"{path}: tensor mean.{name} has shape "
                                 f"{list(mean[name].shape)} but the metadata say {shape}")
        try:
            return cls(mean, var, meta["count"], meta["source"], meta["min_var"],
                       meta["num_floored"], dict(zip(meta["names"], meta["dtypes"])))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def summary(self, quantiles: Sequence[float] = (0.0, 0.01, 0.5, 0.99, 1.0)) -> dict[str, Any]:
        """K, coverage, variance quantiles and floored entries, for people to read."""
        flat = torch.cat([v.flatten() for v in self.var.values()])
        if flat.numel() > 10_000_000:  # torch.quantile's input limit: an even subsample
            flat = flat[:: flat.numel() // 10_000_000 + 1]
        values = torch.quantile(flat.double(), torch.tensor(quantiles, dtype=torch.float64))
        return {
            "source": self.source, "count": self.count, "tensors": len(self.mean),
            "parameters": self.numel, "min_var": self.min_var, "floored": self.num_floored,
            "var_quantiles": {f"{q:g}": float(v) for q, v in zip(quantiles, values)},
        }

    def describe(self) -> str:
        """``summary`` in one line."""
        info = self.summary()
        quantiles = ", ".join(f"q{q}={v:.3g}" for q, v in info["var_quantiles"].items())
        return (f"prior: K={info['count']} {info['source']} checkpoints, {info['tensors']} "
                f"tensors, {info['parameters']:,} parameters; variance {quantiles}; "
                f"{info['floored']:,} entries floored at min_var={info['min_var']:g}")
