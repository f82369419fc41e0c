"""ParameterPrior and RunningMoments: the checkpoint prior's maths (docs/method.md §3) and
its files.

Every expected value is computed independently, with ``torch.stack(...).mean(0)`` /
``.var(0)`` in float64 over the snapshots, never from the code under test.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors import safe_open
from safetensors.torch import save_file

import vdu_lightning.prior as prior_module
from vdu_lightning import DiffusionModule
from vdu_lightning.prior import DEFAULT_MIN_VAR, ParameterPrior, RunningMoments

#: Named tensors of different shapes (a conv weight, a bias, a matrix, a 4-d tensor).
SHAPES = {
    "down.conv.weight": (4, 3, 3, 3),
    "down.conv.bias": (4,),
    "mid.proj.weight": (7, 5),
    "up.block.weight": (2, 3, 4, 5),
}


def _snapshots(k: int = 5, seed: int = 0, offset: float = 3.0, scale: float = 1e-3
               ) -> list[dict[str, torch.Tensor]]:
    """K float32 snapshots: a large common offset plus a small spread (like trained weights)."""
    generator = torch.Generator().manual_seed(seed)
    return [{name: offset + scale * torch.randn(shape, generator=generator)
             for name, shape in SHAPES.items()} for _ in range(k)]


def _reference(snapshots: list[dict[str, torch.Tensor]]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean and unbiased variance over the snapshots, in float64, by torch.stack."""
    names = list(snapshots[0])
    stacked = {n: torch.stack([s[n] for s in snapshots]).double() for n in names}
    return ({n: x.mean(0) for n, x in stacked.items()},
            {n: x.var(0, unbiased=True) for n, x in stacked.items()})


def _assert_prior_equal(a: ParameterPrior, b: ParameterPrior) -> None:
    assert a.names == b.names
    for name in a.names:
        assert a.mean[name].dtype == b.mean[name].dtype == torch.float32
        assert a.var[name].dtype == b.var[name].dtype == torch.float32
        torch.testing.assert_close(a.mean[name], b.mean[name], atol=0, rtol=0)
        torch.testing.assert_close(a.var[name], b.var[name], atol=0, rtol=0)
    assert (a.source, a.count, a.min_var, a.num_floored) == (
        b.source, b.count, b.min_var, b.num_floored)
    assert a.dtypes == b.dtypes


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


# ---- RunningMoments and from_tensors: the maths ---------------------------------------------
def test_the_test_data_defeat_a_naive_float32_variance() -> None:
    """Sanity check of the data: E[x²] − E[x]² in float32 is far off, so the tests below can
    tell a numerically careless implementation from a correct one."""
    snapshots = _snapshots()
    _, ref_var = _reference(snapshots)
    x = torch.stack([s["mid.proj.weight"] for s in snapshots])  # float32
    k = x.shape[0]
    naive = ((x * x).mean(0) - x.mean(0) ** 2) * k / (k - 1)
    rel = ((naive.double() - ref_var["mid.proj.weight"]).abs()
           / ref_var["mid.proj.weight"]).max()
    assert rel > 1e-2, f"the naive formula is only {rel:.1e} off: the data are too easy"


def test_running_moments_equal_stacked_mean_and_unbiased_var() -> None:
    snapshots = _snapshots()
    ref_mean, ref_var = _reference(snapshots)
    moments = RunningMoments()
    for snapshot in snapshots:
        moments.update(snapshot)
    assert moments.count == 5
    assert moments.shapes == SHAPES
    for name in SHAPES:
        assert moments.mean[name].dtype == torch.float64
        torch.testing.assert_close(moments.mean[name], ref_mean[name], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(moments.m2[name] / (moments.count - 1), ref_var[name],
                                   atol=0, rtol=1e-9)


def test_from_tensors_equals_stacked_mean_and_var_to_float32_precision() -> None:
    snapshots = _snapshots()
    ref_mean, ref_var = _reference(snapshots)
    prior = ParameterPrior.from_tensors(snapshots, "independent")
    assert prior.names == list(SHAPES)
    assert prior.count == 5 and prior.source == "independent"
    assert prior.min_var == DEFAULT_MIN_VAR
    for name, shape in SHAPES.items():
        assert prior.mean[name].shape == shape and prior.var[name].shape == shape
        assert prior.mean[name].dtype == prior.var[name].dtype == torch.float32
        # float32 precision: one rounding of the float64 result (2**-24 ≈ 6e-8 relative).
        torch.testing.assert_close(prior.mean[name].double(), ref_mean[name],
                                   atol=0, rtol=2e-7)
        torch.testing.assert_close(prior.var[name].double(),
                                   ref_var[name].clamp_min(DEFAULT_MIN_VAR), atol=0, rtol=2e-7)


@pytest.mark.parametrize("split", [2, 1, 4])
def test_chan_merge_of_two_parts_equals_the_whole(split: int) -> None:
    snapshots = _snapshots()
    ref_mean, ref_var = _reference(snapshots)
    first, second = RunningMoments(), RunningMoments()
    for snapshot in snapshots[:split]:
        first.update(snapshot)
    for snapshot in snapshots[split:]:
        second.update(snapshot)
    first.merge(second)
    assert first.count == 5
    for name in SHAPES:
        torch.testing.assert_close(first.mean[name], ref_mean[name], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(first.m2[name] / 4, ref_var[name], atol=0, rtol=1e-9)


def test_merge_into_an_empty_one_and_of_an_empty_one() -> None:
    snapshots = _snapshots()
    ref_mean, ref_var = _reference(snapshots)
    whole = RunningMoments()
    for snapshot in snapshots:
        whole.update(snapshot)

    empty = RunningMoments()
    empty.merge(whole)  # into an empty one: a copy
    whole.merge(RunningMoments())  # of an empty one: no change
    for moments in (empty, whole):
        assert moments.count == 5 and moments.shapes == SHAPES
        for name in SHAPES:
            torch.testing.assert_close(moments.mean[name], ref_mean[name], atol=1e-12, rtol=0)
            torch.testing.assert_close(moments.m2[name] / 4, ref_var[name], atol=0, rtol=1e-9)

    # The copy is independent: more updates of the original leave it as it was.
    whole.update(_snapshots(k=1, seed=9)[0])
    for name in SHAPES:
        torch.testing.assert_close(empty.mean[name], ref_mean[name], atol=1e-12, rtol=0)
        torch.testing.assert_close(empty.m2[name] / 4, ref_var[name], atol=0, rtol=1e-9)


def test_merge_of_moments_over_other_tensors_is_refused() -> None:
    first, other = RunningMoments(), RunningMoments()
    first.update({"a": torch.zeros(3)})
    other.update({"a": torch.zeros(4)})
    with pytest.raises(ValueError, match="a: "):
        first.merge(other)


def test_moments_resume_from_a_weights_only_checkpoint(tmp_path: Path) -> None:
    snapshots = _snapshots()
    ref_mean, ref_var = _reference(snapshots)
    moments = RunningMoments()
    for snapshot in snapshots[:2]:
        moments.update(snapshot)
    torch.save(moments.state_dict(), tmp_path / "moments.pt")
    resumed = RunningMoments()
    resumed.load_state_dict(torch.load(tmp_path / "moments.pt", weights_only=True))
    for snapshot in snapshots[2:]:
        resumed.update(snapshot)
    assert resumed.count == 5
    for name in SHAPES:
        torch.testing.assert_close(resumed.mean[name], ref_mean[name], atol=1e-12, rtol=0)
        torch.testing.assert_close(resumed.m2[name] / 4, ref_var[name], atol=0, rtol=1e-9)


# ---- the min_var floor ------------------------------------------------------------------------
def test_min_var_floors_constant_and_tiny_entries_and_counts_them() -> None:
    min_var = 1e-6
    generator = torch.Generator().manual_seed(3)
    snapshots = []
    for _ in range(5):
        w = 1.0 + 1e-2 * torch.randn(50, generator=generator)  # var ≈ 1e-4: kept
        w[:7] = 0.25  # never moved: variance exactly 0
        w[7:15] = 0.5 + 1e-5 * torch.randn(8, generator=generator)  # var ≈ 1e-10: floored
        b = 2.0 + 1e-2 * torch.randn(3, 4, generator=generator)
        b[1, :] = -1.0  # a constant row
        snapshots.append({"w": w, "b": b})
    _, ref_var = _reference(snapshots)
    expected_floored = sum(int((v < min_var).sum()) for v in ref_var.values())
    assert expected_floored >= 7 + 8 + 4  # the data hold what the test is about

    prior = ParameterPrior.from_tensors(snapshots, "trajectory", min_var=min_var)
    assert prior.num_floored == expected_floored
    assert prior.min_var == min_var
    for name in ("w", "b"):
        expected = torch.maximum(ref_var[name], torch.tensor(min_var, dtype=torch.float64))
        torch.testing.assert_close(prior.var[name].double(), expected, atol=0, rtol=2e-7)
        assert (prior.var[name] > 0).all()
    meta = prior.metadata()
    assert meta["min_var"] == min_var and meta["num_floored"] == expected_floored
    assert prior.summary()["floored"] == expected_floored


# ---- what from_tensors refuses, selects and ignores ------------------------------------------
@pytest.mark.parametrize("k", [0, 1])
def test_fewer_than_two_snapshots_are_refused(k: int) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ParameterPrior.from_tensors(_snapshots(k=k), "trajectory")


def test_fewer_than_two_checkpoint_files_are_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "only.pt")
    with pytest.raises(ValueError, match="at least 2"):
        ParameterPrior.from_checkpoints([tmp_path / "only.pt"])


def test_a_snapshot_missing_a_tensor_is_refused_naming_it() -> None:
    snapshots = _snapshots(k=3)
    del snapshots[2]["mid.proj.weight"]
    with pytest.raises(ValueError, match=r"snapshot 2.*mid\.proj\.weight"):
        ParameterPrior.from_tensors(snapshots, "trajectory")


def test_a_snapshot_with_an_extra_tensor_is_refused_naming_it() -> None:
    snapshots = _snapshots(k=3)
    snapshots[1]["surprise.extra"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"surprise\.extra"):
        ParameterPrior.from_tensors(snapshots, "trajectory")


def test_a_snapshot_with_a_reshaped_tensor_is_refused_naming_it_and_the_shapes() -> None:
    snapshots = _snapshots(k=3)
    snapshots[2]["down.conv.bias"] = torch.ones(5)
    with pytest.raises(ValueError) as info:
        ParameterPrior.from_tensors(snapshots, "trajectory")
    message = str(info.value)
    assert "down.conv.bias" in message and "(5,)" in message and "(4,)" in message, message


def test_include_patterns_select_a_subset() -> None:
    snapshots = _snapshots()
    ref_mean, ref_var = _reference(snapshots)
    prior = ParameterPrior.from_tensors(snapshots, "trajectory",
                                        include=["down.*", "*.block.*"])
    assert prior.names == ["down.conv.weight", "down.conv.bias", "up.block.weight"]
    assert prior.numel == 4 * 27 + 4 + 120
    for name in prior.names:
        torch.testing.assert_close(prior.mean[name].double(), ref_mean[name], atol=0, rtol=2e-7)
        torch.testing.assert_close(prior.var[name].double(), ref_var[name], atol=0, rtol=2e-7)


def test_an_include_matching_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no parameter matches include=\['\*attn\*'\]"):
        ParameterPrior.from_tensors(_snapshots(k=3), "trajectory", include=["*attn*"])


def test_integer_tensors_are_ignored() -> None:
    snapshots = _snapshots(k=3)
    for step, snapshot in enumerate(snapshots):
        snapshot["norm.num_batches_tracked"] = torch.tensor(step, dtype=torch.int64)
        snapshot["pos.index"] = torch.arange(4, dtype=torch.int32)
    prior = ParameterPrior.from_tensors(snapshots, "trajectory")
    assert prior.names == list(SHAPES)


def test_an_unknown_source_is_refused() -> None:
    with pytest.raises(ValueError, match="source must be one of"):
        ParameterPrior.from_tensors(_snapshots(k=2), "guesswork")


# ---- streaming: memory O(parameters) whatever K is ---------------------------------------------
def _tracked_snapshots(k: int, alive_at_next: list[int]):
    """Yield K snapshots one by one; before making each, record how many earlier ones live."""
    refs: list[weakref.ref] = []
    generator = torch.Generator().manual_seed(5)
    gc.freeze()  # older objects out of the collector's way: gc.collect() takes milliseconds
    try:
        for _ in range(k):
            gc.collect()
            alive_at_next.append(sum(ref() is not None for ref in refs))
            snapshot = {"w": 3.0 + 1e-3 * torch.randn(64, 32, generator=generator),
                        "b": 1.0 + 1e-3 * torch.randn(32, generator=generator)}
            refs.append(weakref.ref(snapshot["w"]))
            yield snapshot
            del snapshot
        gc.collect()
        alive_at_next.append(sum(ref() is not None for ref in refs))
    finally:
        gc.unfreeze()


def test_from_tensors_streams_older_snapshots_are_released() -> None:
    """Memory must not grow with K: no snapshot older than the previous one stays alive."""
    alive: list[int] = []
    prior = ParameterPrior.from_tensors(_tracked_snapshots(8, alive), "trajectory")
    assert prior.count == 8
    assert max(alive) <= 1, f"snapshots alive when the next was made: {alive}"


def test_from_tensors_never_holds_two_snapshots_at_once() -> None:
    """The previous snapshot is dead when the next one is made: peak memory is one snapshot."""
    alive: list[int] = []
    prior = ParameterPrior.from_tensors(_tracked_snapshots(4, alive), "trajectory")
    assert prior.count == 4
    assert alive == [0, 0, 0, 0, 0], (
        f"BUG in ParameterPrior.from_tensors: earlier snapshots still alive each time the "
        f"next one is made: {alive} (want all 0). While the iterable produces snapshot k, "
        "snapshot k-1 is still referenced by the loop variables `snapshot` and `floating` "
        "and by the result tuple that `enumerate` caches and only refills after its next(), "
        "so two snapshots are in memory at once (e.g. two checkpoints in from_checkpoints)"
    )


# ---- from_checkpoints over real files ----------------------------------------------------------
def _lightning_checkpoints(directory: Path, config: dict, k: int = 3
                           ) -> tuple[list[Path], list[dict[str, torch.Tensor]],
                                      list[dict[str, torch.Tensor]]]:
    """K DiffusionModule checkpoints in Lightning's layout with perturbed raw and EMA UNets."""
    module = DiffusionModule(unet=config)
    paths, raw, ema = [], [], []
    for i in range(k):
        _perturb(module.unet, seed=10 + i)
        _perturb(module.ema_unet, seed=100 + i)
        state = {name: t.detach().clone() for name, t in module.state_dict().items()}
        assert any(n.startswith("unet.") for n in state)
        assert any(n.startswith("ema_unet.") for n in state)
        state["unet.step_counter"] = torch.tensor(i, dtype=torch.int64)  # not a parameter
        path = directory / f"epoch={i}.ckpt"
        torch.save({"state_dict": state, "epoch": i, "global_step": 10 * i,
                    "pytorch-lightning_version": "2.6.6"}, path)
        paths.append(path)
        raw.append({n: t.clone() for n, t in module.unet.state_dict().items()})
        ema.append({n: t.clone() for n, t in module.ema_unet.state_dict().items()})
    return paths, raw, ema


def _assert_matches_reference(prior: ParameterPrior, snapshots: list[dict[str, torch.Tensor]]
                              ) -> None:
    ref_mean, ref_var = _reference(snapshots)
    assert sorted(prior.names) == sorted(ref_mean)  # safetensors files list keys sorted
    for name in prior.names:
        torch.testing.assert_close(prior.mean[name].double(), ref_mean[name],
                                   atol=1e-7, rtol=2e-7)
        torch.testing.assert_close(prior.var[name].double(),
                                   ref_var[name].clamp_min(prior.min_var), atol=0, rtol=2e-7)


def test_from_lightning_checkpoints_ema_and_raw(tmp_path: Path, tiny_unet_config: dict) -> None:
    paths, raw, ema = _lightning_checkpoints(tmp_path, tiny_unet_config)
    prior_ema = ParameterPrior.from_checkpoints(paths, "trajectory", weights="ema")
    prior_raw = ParameterPrior.from_checkpoints(paths, "trajectory", weights="raw")
    assert prior_ema.count == prior_raw.count == 3
    assert "step_counter" not in prior_raw.names
    _assert_matches_reference(prior_ema, ema)
    _assert_matches_reference(prior_raw, raw)
    # The two copies really differ, so the prefix choice is what the test checks.
    name = "conv_in.weight"
    assert not torch.allclose(prior_ema.mean[name], prior_raw.mean[name])
    # Names are the UNet's own (no module prefix): the prior matches the bare UNet.
    prior_ema.check_matches(UNet2DModel(**tiny_unet_config).named_parameters())


def test_from_checkpoints_with_include(tmp_path: Path, tiny_unet_config: dict) -> None:
    paths, _, ema = _lightning_checkpoints(tmp_path, tiny_unet_config, k=2)
    prior = ParameterPrior.from_checkpoints(paths, include=["up_blocks.*"])
    expected = [n for n in ema[0] if n.startswith("up_blocks.")]
    assert expected and prior.names == expected
    _assert_matches_reference(prior, [{n: s[n] for n in expected} for s in ema])


def test_from_diffusers_directories(tmp_path: Path, tiny_unet_config: dict) -> None:
    module = DiffusionModule(unet=tiny_unet_config)
    paths, snapshots = [], []
    for i in range(3):
        _perturb(module.ema_unet, seed=20 + i)
        path = tmp_path / f"model_{i}"
        module.save_pretrained(path)  # exports the EMA UNet
        assert (path / "unet").is_dir()
        paths.append(path)
        snapshots.append({n: t.clone() for n, t in module.ema_unet.state_dict().items()})
    prior = ParameterPrior.from_checkpoints(paths, "independent")
    assert prior.count == 3 and prior.source == "independent"
    _assert_matches_reference(prior, snapshots)


def test_a_missing_checkpoint_is_reported_before_anything_is_read(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(3)}, tmp_path / "good.pt")
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint at all")
    # Were files read in order, the corrupt one would raise a ValueError first.
    with pytest.raises(FileNotFoundError, match="gone.ckpt"):
        ParameterPrior.from_checkpoints([tmp_path / "good.pt", tmp_path / "corrupt.ckpt",
                                         tmp_path / "gone.ckpt"])


def test_a_truncated_checkpoint_is_refused(tmp_path: Path, tiny_unet_config: dict) -> None:
    paths, _, _ = _lightning_checkpoints(tmp_path, tiny_unet_config, k=2)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="epoch=1.ckpt"):
        ParameterPrior.from_checkpoints(paths)


class _RunsCode:
    """An object whose unpickling opens (creates) a file: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_whose_pickle_runs_code_is_refused_without_running_it(
        tmp_path: Path) -> None:
    def write(path: Path, marker: Path) -> None:
        torch.save({"state_dict": {"unet.w": torch.zeros(3)}, "callback": _RunsCode(marker)},
                   path)

    # The payload is live: an unsafe load would create the marker file.
    write(tmp_path / "probe.ckpt", tmp_path / "probe_marker")
    handle = torch.load(tmp_path / "probe.ckpt", weights_only=False)["callback"]
    handle.close()
    assert (tmp_path / "probe_marker").exists()

    torch.save({"state_dict": {"unet.w": torch.ones(3)}}, tmp_path / "good.ckpt")
    marker = tmp_path / "pwned"
    write(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match="evil.ckpt"):
        ParameterPrior.from_checkpoints([tmp_path / "good.ckpt", tmp_path / "evil.ckpt"],
                                        weights="raw")
    assert not marker.exists(), "loading the checkpoint ran the code in its pickle"


# ---- the prior file ---------------------------------------------------------------------------
def _prior_for_files() -> ParameterPrior:
    snapshots = _snapshots(k=4, seed=7)
    for snapshot in snapshots:
        snapshot["down.conv.bias"][:2] = 0.5  # constant entries: floored
        snapshot["half.weight"] = (1.0 + 1e-2 * torch.randn(6)).to(torch.bfloat16)
    return ParameterPrior.from_tensors(snapshots, "finetune", min_var=1e-7)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    prior = _prior_for_files()
    assert prior.num_floored >= 2
    assert prior.dtypes["half.weight"] == "bfloat16"
    prior.save(tmp_path / "prior.safetensors")
    loaded = ParameterPrior.load(tmp_path / "prior.safetensors")
    _assert_prior_equal(loaded, prior)
    assert [tuple(t.shape) for t in loaded.mean.values()] == [
        *SHAPES.values(), (6,)]
    assert loaded.source == "finetune" and loaded.count == 4 and loaded.min_var == 1e-7


def test_the_prior_file_is_plain_safetensors_with_json_metadata(tmp_path: Path) -> None:
    prior = _prior_for_files()
    prior.save(tmp_path / "prior.safetensors")
    with safe_open(str(tmp_path / "prior.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        meta = json.loads(handle.metadata()["vdu_prior"])
        tensors = {key: handle.get_tensor(key) for key in keys}
    assert keys == {f"{kind}.{n}" for kind in ("mean", "var") for n in prior.names}
    for name in prior.names:
        torch.testing.assert_close(tensors[f"mean.{name}"], prior.mean[name], atol=0, rtol=0)
        torch.testing.assert_close(tensors[f"var.{name}"], prior.var[name], atol=0, rtol=0)
    assert meta["names"] == prior.names
    assert meta["shapes"] == [list(prior.mean[n].shape) for n in prior.names]
    assert meta["dtypes"] == [prior.dtypes[n] for n in prior.names]
    assert (meta["source"], meta["count"], meta["min_var"], meta["num_floored"]) == (
        "finetune", 4, 1e-7, prior.num_floored)


def test_state_dict_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    prior = _prior_for_files()
    torch.save({"prior": prior.state_dict()}, tmp_path / "x.ckpt")
    state = torch.load(tmp_path / "x.ckpt", weights_only=True)["prior"]
    _assert_prior_equal(ParameterPrior.from_state_dict(state), prior)


def test_loading_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        ParameterPrior.load(tmp_path / "nothing.safetensors")


def test_loading_a_safetensors_file_without_prior_metadata_is_refused(tmp_path: Path) -> None:
    save_file({"mean.w": torch.zeros(3), "var.w": torch.ones(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="no prior metadata"):
        ParameterPrior.load(tmp_path / "w.safetensors")


def test_loading_a_file_that_is_not_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="not a readable prior file"):
        ParameterPrior.load(tmp_path / "junk.safetensors")


def _hand_written_prior(path: Path, var: torch.Tensor, without: tuple[str, ...] = (),
                        **header: object) -> None:
    """A prior file written by hand: its header ``without`` some keys, or with others."""
    meta = {"format_version": 1, "source": "trajectory", "count": 3, "min_var": 1e-8,
            "num_floored": 0, "names": ["layer.weight"], "shapes": [list(var.shape)],
            "dtypes": ["float32"], **header}
    meta = {key: value for key, value in meta.items() if key not in without}
    save_file({"mean.layer.weight": torch.zeros(var.shape), "var.layer.weight": var},
              str(path), metadata={"vdu_prior": json.dumps(meta)})


def test_hand_written_prior_loads_when_valid(tmp_path: Path) -> None:
    _hand_written_prior(tmp_path / "ok.safetensors", torch.tensor([1.0, 2.0, 3.0]))
    prior = ParameterPrior.load(tmp_path / "ok.safetensors")
    assert prior.names == ["layer.weight"] and prior.count == 3
    torch.testing.assert_close(prior.var["layer.weight"], torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 0.0, float("inf")])
def test_a_prior_file_with_an_invalid_variance_is_refused(tmp_path: Path, bad: float) -> None:
    path = tmp_path / "bad.safetensors"
    _hand_written_prior(path, torch.tensor([1.0, bad, 3.0]))
    with pytest.raises(ValueError) as info:
        ParameterPrior.load(path)
    message = str(info.value)
    assert "layer.weight" in message and "variance" in message and "bad.safetensors" in message


@pytest.mark.parametrize("without, header, message", [
    (("count",), {}, r"its header lacks \['count'\]"),
    (("count", "min_var"), {}, r"its header lacks \['count', 'min_var'\]"),
    ((), {"names": [], "shapes": [], "dtypes": []},
     r"its header lists no parameter \('names' is empty\)"),
])
def test_a_prior_file_header_without_a_key_or_a_parameter_is_refused(
        tmp_path: Path, without: tuple[str, ...], header: dict, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    _hand_written_prior(path, torch.tensor([1.0, 2.0]), without, **header)
    with pytest.raises(ValueError, match=r"^\S*bad\.safetensors is not a readable prior file "
                                         r"\(.*\): " + message):
        ParameterPrior.load(path)


@pytest.mark.parametrize("min_var", [float("nan"), -1.0, 0.0, float("inf")])
def test_a_variance_floor_that_cannot_floor_is_refused_before_a_snapshot_is_read(
        min_var: float) -> None:
    read = []

    def snapshots():
        read.append(1)
        yield from _snapshots(k=2)

    with pytest.raises(ValueError, match=r"^min_var must be a positive, finite variance floor "
                                         rf"\(e\.g\. 1e-08\), got {min_var}$"):
        ParameterPrior.from_tensors(snapshots(), "trajectory", min_var=min_var)
    assert not read


def test_a_failed_save_leaves_the_existing_prior_intact(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prior.safetensors"
    old = ParameterPrior.from_tensors(_snapshots(k=3, seed=1), "trajectory")
    old.save(path)
    old_bytes = path.read_bytes()

    def fail_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(prior_module, "save_file", fail_midway)
    new = ParameterPrior.from_tensors(_snapshots(k=3, seed=2), "independent")
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    assert path.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.safetensors"]
    _assert_prior_equal(ParameterPrior.load(path), old)


# ---- matching a model -------------------------------------------------------------------------
def _unet_prior(config: dict, include: list[str] | None = None) -> ParameterPrior:
    unet = UNet2DModel(**config)
    snapshots = []
    for i in range(2):
        _perturb(unet, seed=30 + i)
        snapshots.append({n: p.detach().clone() for n, p in unet.named_parameters()})
    return ParameterPrior.from_tensors(snapshots, "trajectory", include=include)


def test_check_matches_refuses_another_architecture_naming_a_parameter(
        tiny_unet_config: dict) -> None:
    prior = _unet_prior(tiny_unet_config)
    prior.check_matches(UNet2DModel(**tiny_unet_config).named_parameters())  # its own: fine

    other = UNet2DModel(**{**tiny_unet_config, "block_out_channels": [16, 64]})
    other_shapes = {n: tuple(p.shape) for n, p in other.named_parameters()}
    mismatched = {n: (tuple(prior.mean[n].shape), other_shapes[n]) for n in prior.names
                  if n in other_shapes and tuple(prior.mean[n].shape) != other_shapes[n]}
    assert mismatched
    with pytest.raises(ValueError) as info:
        prior.check_matches(other.named_parameters())
    message = str(info.value)
    named = [n for n, (ours, theirs) in mismatched.items()
             if f"'{n}: " in message and str(ours) in message and str(theirs) in message]
    assert named, f"no mismatching parameter named with both shapes in: {message}"


def test_a_prior_over_a_subset_matches_the_full_model(tiny_unet_config: dict) -> None:
    prior = _unet_prior(tiny_unet_config, include=["down_blocks.*"])
    full = dict(UNet2DModel(**tiny_unet_config).named_parameters())
    assert 0 < len(prior.names) < len(full)
    prior.check_matches(full.items())


def test_a_prior_name_absent_from_the_model_is_named(tiny_unet_config: dict) -> None:
    unet = UNet2DModel(**tiny_unet_config)
    snapshots = [{"conv_in.weight": unet.conv_in.weight.detach() + i,
                  "attention.ghost.weight": torch.randn(3)} for i in range(2)]
    prior = ParameterPrior.from_tensors(snapshots, "trajectory")
    with pytest.raises(ValueError, match=r"attention\.ghost\.weight"):
        prior.check_matches(unet.named_parameters(), model="the tiny UNet")


# ---- summary ----------------------------------------------------------------------------------
def test_summary_is_consistent_with_the_variances() -> None:
    snapshots = _snapshots()
    for snapshot in snapshots:
        snapshot["mid.proj.weight"][0] = 0.0  # 5 constant entries
    _, ref_var = _reference(snapshots)
    floored = sum(int((v < DEFAULT_MIN_VAR).sum()) for v in ref_var.values())
    prior = ParameterPrior.from_tensors(snapshots, "trajectory")
    summary = prior.summary()
    assert summary["count"] == 5 and summary["source"] == "trajectory"
    assert summary["tensors"] == len(SHAPES)
    assert summary["parameters"] == sum(torch.Size(s).numel() for s in SHAPES.values())
    assert summary["floored"] == floored >= 5
    flat = torch.cat([v.clamp_min(DEFAULT_MIN_VAR).flatten() for v in ref_var.values()])
    qs = [0.0, 0.01, 0.5, 0.99, 1.0]
    expected = torch.quantile(flat, torch.tensor(qs, dtype=torch.float64))
    assert list(summary["var_quantiles"]) == ["0", "0.01", "0.5", "0.99", "1"]
    got = torch.tensor(list(summary["var_quantiles"].values()), dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-6)
    assert summary["var_quantiles"]["0"] == pytest.approx(DEFAULT_MIN_VAR, rel=1e-6)
    assert summary["var_quantiles"]["1"] == pytest.approx(flat.max().item(), rel=1e-6)
