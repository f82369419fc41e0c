"""The catalogue of bad input: what a user sees for each mistake, through ``vdu`` and the API.

Every case asserts the distinctive part of the message the user gets, that the error comes
before the expensive work (the pre-trained model read, the data read, the prior built, a
training step: see ``STAGES``), and that nothing already written is lost (every file of the
earlier runs byte-identical, no temporary file left beside them, and, when the run is
refused before it starts, no file written at all). The runs use the tiny configs of
``configs/tests`` in a copy of a workspace that already holds a pre-trained tiny DDPM, its
checkpoint, its trajectory prior, a classifier and a finished short VDU run.

 1. a missing checkpoint: ``model.pretrained``, ``--ckpt_path``, ``CheckpointPrior``
    checkpoints, ``vdu prior``                         test_a_bad_checkpoint_file_is_refused
 2. a truncated checkpoint in the same four roles      test_a_bad_checkpoint_file_is_refused
 3. a checkpoint whose pickle would run code, in the same four roles; the code never runs
                                                       test_a_bad_checkpoint_file_is_refused
 4. a prior of another model (other names; same names, other shapes)
                                                       test_a_prior_file_that_cannot_serve
 5. a prior file with NaN, with inf, with a negative variance; a header without ``count``
    and ``min_var``, with no ``names``                 test_a_prior_file_that_cannot_serve
 6. a forget class absent from the data                test_a_forget_class_absent_from_the_data
 7. an empty forget set: a folder with no image, a forget_dataset with no item (by class
    path; the Python API is tests/unit/test_datamodules.py::
    test_forget_dataset_given_by_the_user_is_capped)   test_an_empty_forget_set
 8. gamma outside (0, 1)                               test_gamma_outside_the_open_unit_interval
 9. images that do not fit the model: their size, their channels
                                                       test_images_that_do_not_fit_the_model
10. an unknown config key, on the command line and in a YAML file
                                                       test_an_unknown_config_key_is_named
11. NaN during training: UnlearningGuard names step and term, the last good last.ckpt
    stays and resumes                                  test_nan_during_training_stops_the_run
12. an output directory that cannot be written (under a file; read-only, not as root):
    ExportPretrained, ModelCheckpoint, trainer.default_root_dir through ``vdu``, and
    ExportPretrained through the Python API            test_an_output_directory_that_cannot_...
    (the check in ExportPretrained.setup: test_the_export_directory_is_checked_in_setup...)
13. a failure half-way through an export               test_a_failure_half_way_through_an_export
14. files the project writes are written atomically    test_the_package_writes_files_atomically
    (and the check itself finds each kind of write:    test_the_atomic_write_check_finds_...)
15. ``vdu prior``: ``--out`` that is one of the checkpoints (given as ./path), a file of a
    checkpoint directory, an existing directory; ``--min-var nan`` and ``-1``
                                                       test_a_prior_command_that_would_replace...
16. a prior file to write that is an existing directory: CheckpointPrior save_to,
    PriorSnapshot path (the Python API: tests/unit/test_prior_callbacks.py)
                                                       test_a_prior_file_to_write_that_is_a_...
17. ``pretrained``: a Stable Diffusion pipeline; a config.json that is not JSON, or that does
    not fit the weights (other widths, an attention block too many or too few); pickled .bin
    weights, whose code never runs                     test_a_pretrained_directory_that_cannot...
18. a forget folder whose metadata.jsonl names a file outside it (../, an absolute path), or
    that holds a decompression-bomb PNG                test_a_forget_folder_reaching_outside...
    (16-bit grey PNGs are read at their depth: tests/unit/test_data_folder.py::
    test_a_16_bit_grey_png_is_read_at_its_depth)
19. forget_classes naming every class                  test_forgetting_every_class_is_refused...
20. a truncated or code-carrying last.ckpt under ``--ckpt_path last``
                                                       test_a_bad_last_checkpoint_is_refused...
21. a checkpoint whose prior holds NaN, through ``vdu`` and the API (the message names the
    checkpoint)                                        test_a_checkpoint_whose_prior_holds_nan...
22. ``lr`` <= 0                                        test_a_learning_rate_that_is_not_positive...
23. an evaluation classifier directory whose weights are not safetensors, whose config.json
    has a foreign key or another width, or that was written before the input
    standardisation, on ``vdu validate``            test_a_classifier_directory_that_cannot_...
    (the Python API: tests/unit/test_evaluation_parts.py::
    test_a_classifier_directory_that_does_not_fit_is_refused_by_name)
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import pickle
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from diffusers import UNet2DModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

import vdu_lightning.data.datamodules
import vdu_lightning.modules.unlearning
from conftest import CONFIGS, REPO, TINY_UNET
from images import write_decompression_bomb
from tiny_sd import save_tiny_sd
from vdu_lightning import ClassifierModule, ForgetSetDataModule, ParameterPrior, VDUModule
from vdu_lightning.callbacks import CheckpointPrior, ExportPretrained, NonFiniteLossError
from vdu_lightning.cli import VDUCLI, main
from vdu_lightning.diffusion import build_unet
from vdu_lightning.files import load_checkpoint
from vdu_lightning.modules.unlearning import UnlearningModule

TINY_VDU = str(CONFIGS / "tests" / "tiny_vdu.yaml")
PRIOR = "runs/tests/tiny_prior.safetensors"
#: The expensive steps of a run, in the order a ``vdu fit`` reaches them.
STAGES = ("model read", "data read", "prior built", "training step")


# ---- the workspace --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user has on disk when the bad input comes, built once per module."""
    root = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["fit", "--config", str(CONFIGS / "tests" / "tiny_pretrain.yaml")])
        # A stand-in: the classifier is only read by `vdu validate`, never in these runs.
        ClassifierModule(in_channels=1, num_classes=10, width=8).save_pretrained(
            "runs/tests/tiny_classifier")
        main(["fit", "--config", TINY_VDU, "--trainer.max_steps=2"])
    tests = root / "runs" / "tests"
    (checkpoint,) = tests.glob("tiny_pretrain/**/*.ckpt")
    shutil.move(checkpoint, tests / "tiny_ddpm.ckpt")
    shutil.rmtree(tests / "tiny_pretrain")
    assert (tests / "tiny_unlearned").is_dir() and (tests / "tiny_vdu" / "last.ckpt").is_file()
    return root / "runs"


@pytest.fixture
def workspace(tiny_runs: Path, tmp_path: Path) -> Path:
    """This test's own copy of the workspace, in its working directory."""
    shutil.copytree(tiny_runs, tmp_path / "runs")
    return tmp_path


@pytest.fixture
def reached(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How often each of ``STAGES`` was entered (counted even when it then failed)."""
    counts: Counter = Counter()

    def spy(owner: Any, name: str, stage: str, wrap: Any = lambda f: f) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[stage] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrap(counted))

    spy(vdu_lightning.modules.unlearning, "load_diffusion_model", "model read")
    spy(vdu_lightning.data.datamodules, "load_dataset", "data read")
    spy(ParameterPrior, "load", "prior built", staticmethod)  # classmethods, already bound
    spy(ParameterPrior, "from_checkpoints", "prior built", staticmethod)
    spy(UnlearningModule, "training_step", "training step")  # a method: gets self
    return counts


def stopped_before(counts: Counter, stage: str) -> None:
    """Assert the run entered none of ``STAGES`` from ``stage`` on."""
    later = {s: counts[s] for s in STAGES[STAGES.index(stage):] if counts[s]}
    assert not later, f"the run went on to {later} before it stopped"


def written(root: Path) -> dict[str, str]:
    """Every file under ``root``, with a digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def nothing_lost(before: dict[str, str], root: Path) -> list[str]:
    """Assert every file of ``before`` is unchanged and no temporary is left; return the
    new files."""
    after = written(root)
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"lost or changed: {changed}"
    # atomic_file/atomic_directory name their temporaries .<name>.tmp-* and .<name>.old-*.
    temporaries = [p for p in after if re.search(r"(^|/)\.[^/]*\.(tmp|old)-", p)]
    assert not temporaries, f"temporaries left behind: {temporaries}"
    return sorted(set(after) - set(before))


def vdu_callbacks(config: str = TINY_VDU, **init_args: dict) -> str:
    """``--trainer.callbacks``: the callbacks of ``config`` (tiny_vdu.yaml), with the given
    ones' init_args replaced (by class name), e.g.
    ``vdu_callbacks(CheckpointPrior={"checkpoints": [...]})``."""
    callbacks = yaml.safe_load(Path(config).read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        name = callback["class_path"].rsplit(".", 1)[1]
        if name in init_args:
            # jsonargparse merges the init_args of a callback of the same class into the
            # config's: unset the config's own first.
            callback["init_args"] = {**dict.fromkeys(callback.get("init_args", {})),
                                     **init_args.pop(name)}
    assert not init_args, f"no such callback in {config}: {list(init_args)}"
    return "--trainer.callbacks=" + json.dumps(callbacks)


# ---- 1-3: a checkpoint that is missing, truncated, or carries code ---------------------------
class RunsCode:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def truncated(workspace: Path) -> Path:
    data = (workspace / "runs/tests/tiny_ddpm.ckpt").read_bytes()
    (workspace / "runs/tests/bad.ckpt").write_bytes(data[: len(data) // 2])
    return Path("runs/tests/bad.ckpt")


def carrying_code(workspace: Path) -> Path:
    # The payload is live: unpickling it (here, an object of this test, no file) runs it.
    pickle.loads(pickle.dumps(RunsCode(workspace / "probe")))
    assert (workspace / "probe").exists()
    (workspace / "probe").unlink()
    content = load_checkpoint(workspace / "runs/tests/tiny_ddpm.ckpt")
    content["callbacks"]["Evil"] = RunsCode(workspace / "pwned")
    torch.save(content, workspace / "runs/tests/bad.ckpt")
    return Path("runs/tests/bad.ckpt")


PROBLEMS = {
    "missing": (lambda workspace: Path("runs/tests/gone.ckpt"), FileNotFoundError, None),
    "truncated": (truncated, ValueError, r"cannot load checkpoint runs/tests/bad\.ckpt: the "
                                         r"file is truncated or is not a PyTorch checkpoint"),
    "pickled code": (carrying_code, ValueError,
                     r"refused to load checkpoint runs/tests/bad\.ckpt: it holds objects other "
                     r"than tensors and plain values, and unpickling them could run code; "
                     r"checkpoints are only loaded with weights_only=True \(Unsupported "
                     r"global: GLOBAL \S*exec"),
}
#: role: (arguments of `vdu`, what the message starts with, where the run stops, the message
#: for a missing file).
ROLES = {
    "pretrained": (lambda bad: ["fit", "--config", TINY_VDU,
                                f"--model.init_args.pretrained={bad}"], "", "data read",
                   r"pretrained model not found: runs/tests/gone\.ckpt \(expected a diffusers "
                   r"directory or a DiffusionModule checkpoint\)"),
    "ckpt_path": (lambda bad: ["fit", "--config", TINY_VDU, f"--ckpt_path={bad}"],
                  "ckpt_path: ", "model read", r"checkpoint not found: runs/tests/gone\.ckpt"),
    "prior checkpoint": (lambda bad: ["fit", "--config", TINY_VDU, vdu_callbacks(
        CheckpointPrior={"checkpoints": ["runs/tests/tiny_ddpm", str(bad)]})], "",
        "training step", r"checkpoints not found: \['runs/tests/gone\.ckpt'\]"),
    "vdu prior": (lambda bad: ["prior", "--checkpoints", "runs/tests/tiny_ddpm", str(bad),
                               "--out", PRIOR], "vdu prior: error: ", "training step",
                  r"checkpoints not found: \['runs/tests/gone\.ckpt'\]"),
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_a_bad_checkpoint_file_is_refused(problem: str, role: str, workspace: Path,
                                          reached: Counter, capsys) -> None:
    make, error, message = PROBLEMS[problem]
    arguments, prefix, stops_before, missing_message = ROLES[role]
    args = arguments(make(workspace))
    expected = "^" + re.escape(prefix) + (message or missing_message)
    before = written(workspace)
    if role == "vdu prior":  # an argparse command: a message and exit status 2
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        assert re.search(expected, capsys.readouterr().err, re.MULTILINE)
    else:
        with pytest.raises(error, match=expected):
            main(args)
    assert not (workspace / "pwned").exists(), "loading the checkpoint ran the code it carries"
    stopped_before(reached, stops_before)
    assert nothing_lost(before, workspace) == []  # the earlier prior (`--out`) among them


# ---- 4-5: a prior file that cannot serve this model --------------------------------------
def _tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def prior_with_prefixed_names(path: Path) -> None:
    # Built from a Lightning state dict: every name carries the module's "unet." prefix.
    prior = ParameterPrior.load(PRIOR)
    ParameterPrior({f"unet.{n}": t for n, t in prior.mean.items()},
                   {f"unet.{n}": t for n, t in prior.var.items()},
                   prior.count, prior.source).save(path)


def prior_of_a_narrower_unet(path: Path) -> None:
    unet = build_unet({**TINY_UNET, "block_out_channels": [8, 16]})
    snapshots = [{n: p.detach() + 0.01 * k for n, p in unet.named_parameters()}
                 for k in range(2)]
    ParameterPrior.from_tensors(snapshots, "independent").save(path)


def prior_with(kind: str, value: float) -> Any:
    def damage(path: Path) -> None:
        # The values ParameterPrior itself refuses to hold: written with safetensors directly.
        tensors, metadata = _tensors_and_metadata(Path(PRIOR))
        tensors[f"{kind}.conv_in.weight"][0, 0, 0, 0] = value
        save_file(tensors, str(path), metadata=metadata)
    return damage


def prior_header(without: tuple[str, ...] = (), **header: Any) -> Any:
    """A prior file whose header lacks the keys ``without``, or holds ``header``."""
    def damage(path: Path) -> None:
        tensors, metadata = _tensors_and_metadata(Path(PRIOR))
        header_of = {**json.loads(metadata["vdu_prior"]), **header}
        metadata["vdu_prior"] = json.dumps({k: v for k, v in header_of.items()
                                            if k not in without})
        save_file(tensors, str(path), metadata=metadata)
    return damage


BAD_VALUES = r"^runs/tests/bad_prior\.safetensors: "
NOT_A_PRIOR = (r"^runs/tests/bad_prior\.safetensors is not a readable prior file \(a safetensors "
               r"file written by ParameterPrior\.save / `vdu prior`\): ")
BAD_PRIORS = {
    "other names": (prior_with_prefixed_names,
                    r"^the prior \(3 trajectory checkpoints, \d+ tensors\) does not match the "
                    r"model being unlearned: \d+ prior tensors are not in the model, e\.g\. "
                    r"\['unet\.conv_in\.weight'"),
    "other shapes": (prior_of_a_narrower_unet,
                     r"^the prior \(2 independent checkpoints, \d+ tensors\) does not match "
                     r"the model being unlearned: \d+ have other shapes, e\.g\. "
                     r"\['conv_in\.weight: prior \(8, 1, 3, 3\), model \(16, 1, 3, 3\)'"),
    "NaN variance": (prior_with("var", math.nan), BAD_VALUES + r"prior variance of "
                     r"'conv_in\.weight' holds NaN, inf, zero or negative values: a variance "
                     r"must be positive and finite$"),
    "inf mean": (prior_with("mean", math.inf),
                 BAD_VALUES + r"prior mean of 'conv_in\.weight' holds NaN or inf$"),
    "negative variance": (prior_with("var", -1.0), BAD_VALUES + r"prior variance of "
                          r"'conv_in\.weight' holds NaN, inf, zero or negative values"),
    "header without count and min_var": (prior_header(without=("count", "min_var")),
                                         NOT_A_PRIOR + r"its header lacks \['count', 'min_var'\] "
                                         r"\(a prior header has \['names', "),
    "header with no names": (prior_header(names=[], shapes=[], dtypes=[]),
                             NOT_A_PRIOR + r"its header lists no parameter \('names' is empty\): "
                             r"a prior covers at least one$"),
}


@pytest.mark.parametrize("case", BAD_PRIORS)
def test_a_prior_file_that_cannot_serve_the_model_is_refused(case: str, workspace: Path,
                                                             reached: Counter) -> None:
    make, message = BAD_PRIORS[case]
    make(workspace / "runs/tests/bad_prior.safetensors")
    reached.clear()  # making the file may have read the good prior
    before = written(workspace)
    with pytest.raises(ValueError, match=message):
        main(["fit", "--config", TINY_VDU, vdu_callbacks(
            CheckpointPrior={"prior": "runs/tests/bad_prior.safetensors"})])
    stopped_before(reached, "training step")
    assert reached["prior built"] == 1
    assert nothing_lost(before, workspace) == []


# ---- 6-9: data and arguments ------------------------------------------------------------
def test_a_forget_class_absent_from_the_data_is_refused_before_data_are_read(
        workspace: Path, reached: Counter) -> None:
    before = written(workspace)
    with pytest.raises(ValueError, match=r"^classes \[42\] are not in dataset 'digits', whose "
                                         r"classes are \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]$"):
        main(["fit", "--config", TINY_VDU, "--data.init_args.forget_classes=[42]"])
    stopped_before(reached, "data read")
    assert nothing_lost(before, workspace) == []


class NoItems(Dataset):
    """A forget set that came out empty (e.g. a filter that matched nothing)."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int) -> dict:
        raise IndexError(index)


@pytest.mark.parametrize("source", ["folder with no image", "dataset with no item"])
def test_an_empty_forget_set_is_refused(source: str, workspace: Path, reached: Counter) -> None:
    (workspace / "forget").mkdir()
    (workspace / "forget" / "README.txt").write_text("the images were never copied here\n")
    if source == "folder with no image":
        given = ["--data.init_args.forget_folder=forget"]
        error, message = FileNotFoundError, r"^no images in forget: expected files ending in"
    else:
        given = ["--data.init_args.forget_dataset=" + json.dumps(
            {"class_path": f"{__name__}.NoItems"})]
        error, message = ValueError, r"^forget_dataset is empty: the forget set needs at least"
    before = written(workspace)
    with pytest.raises(error, match=message):
        main(["fit", "--config", TINY_VDU, "--data.init_args.forget_classes=null", *given])
    stopped_before(reached, "data read")
    assert nothing_lost(before, workspace) == []


@pytest.mark.parametrize("gamma", ["0", "1", "-0.5", "1.5"])
def test_gamma_outside_the_open_unit_interval_is_refused_before_the_model_is_read(
        gamma: str, workspace: Path, reached: Counter) -> None:
    before = written(workspace)
    with pytest.raises(ValueError, match=rf"^gamma must be in \(0, 1\), got {float(gamma)}: "
                                         "0 is plain gradient ascent"):
        main(["fit", "--config", TINY_VDU, f"--model.init_args.gamma={gamma}"])
    stopped_before(reached, "model read")
    assert nothing_lost(before, workspace) == []


def rgb_folder(workspace: Path) -> list[str]:
    (workspace / "rgb").mkdir()
    for index in range(2):
        Image.new("RGB", (8, 8), (255, 40 * index, 0)).save(workspace / "rgb" / f"{index}.png")
    return ["--data.init_args.dataset=folder", "--data.init_args.root=rgb",
            "--data.init_args.image_size=8"]


@pytest.mark.parametrize("case, message", [
    ("image_size=16", r"16x16 images but the UNet takes 8x8\. Set data\.image_size"),
    ("RGB images", r"3 channels but the UNet takes 1\. Set data\.image_size"),
])
def test_images_that_do_not_fit_the_model_are_refused_before_data_are_read(
        case: str, message: str, workspace: Path, reached: Counter) -> None:
    data = (["--data.init_args.image_size=16"] if case == "image_size=16"
            else rgb_folder(workspace))
    before = written(workspace)
    with pytest.raises(ValueError, match=r"^the data \(dataset='\w+'\) do not fit the model: "
                                         + message):
        main(["fit", "--config", TINY_VDU, *data])
    stopped_before(reached, "data read")
    assert nothing_lost(before, workspace) == []


@pytest.mark.parametrize("where, message", [
    ("command line", r"Option 'gama' is not accepted"),
    ("YAML, top level", r"error: Subcommand 'fit' does not accept option 'trainr\.max_steps'"),
    ("YAML, nested", r"Option 'gama' is not accepted"),
])
def test_an_unknown_config_key_is_named(where: str, message: str, workspace: Path,
                                        reached: Counter, capsys) -> None:
    typo = {"command line": None, "YAML, top level": "trainr:\n  max_steps: 2\n",
            "YAML, nested": "model:\n  init_args:\n    gama: 0.5\n"}[where]
    if typo is None:
        args = ["--model.init_args.gama=0.5"]
    else:
        (workspace / "typo.yaml").write_text(typo)
        args = ["--config", "typo.yaml"]
    before = written(workspace)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY_VDU, *args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    stopped_before(reached, "model read")
    assert nothing_lost(before, workspace) == []


# ---- 11: NaN during training --------------------------------------------------------------
class NaNAtStep(VDUModule):
    """VDU whose plasticity term turns NaN at one step, as a diverging run's would."""

    def __init__(self, pretrained: str, nan_step: int = 3, **kwargs: Any) -> None:
        super().__init__(pretrained, **kwargs)
        self.nan_step = nan_step

    def plasticity_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = super().plasticity_loss(batch)
        return loss * math.nan if self.global_step == self.nan_step else loss


def test_nan_during_training_stops_the_run_and_the_last_good_checkpoint_resumes(
        workspace: Path) -> None:
    run = workspace / "runs/tests/tiny_vdu"
    shutil.rmtree(run)  # every checkpoint there is then this run's
    before = written(workspace)
    # tiny_vdu.yaml validates and checkpoints every 2 steps: last.ckpt is written at step 2.
    with pytest.raises(NonFiniteLossError, match=r"^unlearning stopped at step 3: plasticity "
                                                 r"= nan; loss = nan\. The optimizer step was "
                                                 r"not taken"):
        main(["fit", "--config", TINY_VDU, f"--model.class_path={__name__}.NaNAtStep",
              "--model.init_args.nan_step=3", "--trainer.max_steps=6"])
    # Nothing was exported over the earlier export; no checkpoint holds step 3's weights.
    new = nothing_lost(before, workspace)
    assert not [p for p in new if not p.startswith("runs/tests/tiny_vdu/")]
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    last = load_checkpoint(run / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    # Loadable: the run resumes from it (to step 3, short of the NaN step), with its class.
    cli = VDUCLI(args=["fit", "--config", TINY_VDU, f"--model.class_path={__name__}.NaNAtStep",
                       "--model.init_args.nan_step=3", "--ckpt_path",
                       "runs/tests/tiny_vdu/last.ckpt", "--trainer.max_steps=3"])
    assert cli.trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in cli.model.unet.parameters())


# ---- 12: an output directory that cannot be written ------------------------------------
OUTPUTS = {
    "ExportPretrained": (lambda d: [vdu_callbacks(ExportPretrained={"dirpath": d})],
                         "ExportPretrained dirpath"),
    "ModelCheckpoint": (lambda d: [vdu_callbacks(ModelCheckpoint={"dirpath": d,
                                                                  "save_last": True})],
                        "ModelCheckpoint dirpath"),
    "default_root_dir": (lambda d: [f"--trainer.default_root_dir={d}"],
                         "trainer.default_root_dir"),
}


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("obstacle", ["parent is a file", "parent is read-only"])
def test_an_output_directory_that_cannot_be_written_is_refused_before_training(
        obstacle: str, output: str, workspace: Path, reached: Counter) -> None:
    blocker = workspace / "runs" / "blocker"
    if obstacle == "parent is a file":
        blocker.write_text("a file where a directory was expected\n")
        why = "is a file, not a directory"
    else:
        blocker.mkdir()
        blocker.chmod(0o500)
        if os.access(blocker, os.W_OK):  # root (CAP_DAC_OVERRIDE) writes there anyway
            blocker.chmod(0o700)
            pytest.skip("this process may write into read-only directories")
        why = "is not writable"
    arguments, what = OUTPUTS[output]
    before = written(workspace)
    try:
        with pytest.raises(OSError, match=rf"^cannot write the {re.escape(what)} \S*runs/"
                                          rf"blocker/out: \S*runs/blocker {why}$"):
            main(["fit", "--config", TINY_VDU, *arguments("runs/blocker/out")])
    finally:
        if blocker.is_dir():
            blocker.chmod(0o700)  # so that pytest can remove tmp_path
    stopped_before(reached, "data read")
    assert nothing_lost(before, workspace) == []


def test_the_export_directory_is_checked_in_setup_through_the_python_api(
        workspace: Path, reached: Counter) -> None:
    (workspace / "runs" / "blocker").write_text("a file\n")
    before = written(workspace)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, default_root_dir="runs/api",
                         enable_progress_bar=False, callbacks=[
                             CheckpointPrior(prior=PRIOR),
                             ExportPretrained("runs/blocker/unlearned")])
    data = ForgetSetDataModule(dataset="digits", forget_classes=[3], forget_size=32,
                               eval_size=16, batch_size=16)
    with pytest.raises(NotADirectoryError, match=r"^cannot write the ExportPretrained dirpath "
                                                 r"runs/blocker/unlearned: runs/blocker is a "
                                                 r"file, not a directory$"):
        trainer.fit(VDUModule("runs/tests/tiny_ddpm"), datamodule=data)
    stopped_before(reached, "training step")
    assert nothing_lost(before, workspace) == []


# ---- 13: a failure half-way through an export ------------------------------------------
def test_a_failure_half_way_through_an_export_keeps_the_earlier_export(
        workspace: Path, monkeypatch: pytest.MonkeyPatch, reached: Counter) -> None:
    half_written: dict[Path, list[str]] = {}
    save_unet = UNet2DModel.save_pretrained

    @functools.wraps(save_unet)
    def unet_then_disk_full(self: UNet2DModel, save_directory: str, **kwargs: Any) -> None:
        save_unet(self, save_directory, **kwargs)
        export = Path(save_directory).parent
        half_written[export] = sorted(str(p.relative_to(export)) for p in export.rglob("*"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(UNet2DModel, "save_pretrained", unet_then_disk_full)
    shutil.rmtree(workspace / "runs/tests/tiny_vdu")  # every checkpoint there is this run's
    before = written(workspace)
    with pytest.raises(OSError, match="No space left on device"):
        main(["fit", "--config", TINY_VDU])
    # The export had written the UNet's weights into a directory of its own...
    ((export, files),) = half_written.items()
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert export.parent == Path("runs/tests") and export.name != "tiny_unlearned"
    # ...which is gone; the earlier export and everything else are unchanged.
    assert not export.exists()
    new = nothing_lost(before, workspace)
    assert not [p for p in new if not p.startswith("runs/tests/tiny_vdu/")]
    # The training itself is not lost: its checkpoint is there.
    assert load_checkpoint(workspace / "runs/tests/tiny_vdu/last.ckpt")["global_step"] == 4
    # A whole run enters every stage: the spies the other cases rely on do count.
    assert all(reached[stage] for stage in STAGES), reached


# ---- 14: files the project writes are written atomically ---------------------------------
#: `.save(`/`.save_pretrained(` calls that are no direct write: (method, receiver): why.
NOT_DIRECT_WRITES = {
    ("save", "self.noise"): "NoiseStreams.save puts its state into the checkpoint dict",
    ("save", "prior"): "ParameterPrior.save writes through atomic_file (checked here too)",
    ("save_pretrained", "pl_module"): "the project's modules export through atomic_directory "
                                      "(checked here too)",
    ("save_pretrained", "self.module"): "the same",
}
WRITE_METHODS = {"savefig", "write_text", "write_bytes", "save_file", "save_image"}


def _writes_a_file(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name == "open":  # open(path, mode), Path.open(mode); Image.open(path) only reads
        modes = [kw.value for kw in call.keywords if kw.arg == "mode"]
        modes += (call.args[1:2] if isinstance(func, ast.Name) else
                  [a for a in call.args[:1] if isinstance(a, ast.Constant)])
        # A mode only known at run time counts as a write.
        return any(not isinstance(m, ast.Constant) or set(str(m.value)) & set("wax+")
                   for m in modes)
    if name == "dump":
        return isinstance(func, ast.Attribute) and ast.unparse(func.value) == "json"
    if name in ("save", "save_pretrained") and isinstance(func, ast.Attribute):
        return (name, ast.unparse(func.value)) not in NOT_DIRECT_WRITES
    return name in WRITE_METHODS


def _inside_atomic_blocks(tree: ast.AST) -> set[int]:
    """Lines in the body of a ``with atomic_file(...)``/``atomic_directory(...)`` block."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call)
                and ast.unparse(item.context_expr.func).split(".")[-1]
                in ("atomic_file", "atomic_directory") for item in node.items):
            lines.update(range(node.body[0].lineno, node.end_lineno + 1))
    return lines


def test_the_package_writes_files_atomically() -> None:
    direct = []
    for path in sorted((REPO / "vdu_lightning").rglob("*.py")):
        if path.name == "files.py" and path.parent.name == "vdu_lightning":
            continue  # where the atomic writes are implemented
        tree = ast.parse(path.read_text(), str(path))
        atomic = _inside_atomic_blocks(tree)
        direct += [f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:80]}"
                   for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and _writes_a_file(node) and node.lineno not in atomic]
    assert not direct, ("write these through vdu_lightning.files (atomic_file, "
                        "atomic_directory, atomic_write_text):\n" + "\n".join(sorted(direct)))


def test_the_atomic_write_check_finds_a_direct_write() -> None:
    # The check above must be able to fail: each kind of direct write is found, and the
    # same write inside an atomic block is not.
    source = '''
open(path, "w").write("x")
path.write_text("x")
torch.save(state, path)
save_file(tensors, path)
figure.savefig(path)
image.save(path)
json.dump(data, handle)
path.open("a")
open(path, mode)
unet.save_pretrained(path)
with atomic_file(path) as tmp:
    tmp.write_text("x")
open(path).read()
Image.open(path)
self.noise.save(self, checkpoint)
pl_module.save_pretrained(path)
save_pretrained(unet, scheduler, path)
'''
    tree = ast.parse(source)
    atomic = _inside_atomic_blocks(tree)
    found = sorted(node.lineno for node in ast.walk(tree)
                   if isinstance(node, ast.Call) and _writes_a_file(node)
                   and node.lineno not in atomic)
    assert found == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


# ---- 15-16: `vdu prior` and the prior files a run writes ----------------------------------
TWO_CHECKPOINTS = ["--checkpoints", "runs/tests/tiny_ddpm.ckpt", "runs/tests/tiny_ddpm"]
FLOOR = r"argument --min-var: min_var must be a positive, finite variance floor \(e\.g\. 1e-08\)"
PRIOR_COMMANDS = {
    # ./x and x are one file.
    "--out is a checkpoint": (["--out", "./runs/tests/tiny_ddpm.ckpt"],
                              r"--out \./runs/tests/tiny_ddpm\.ckpt is the checkpoint "
                              r"runs/tests/tiny_ddpm\.ckpt: writing the prior there would "
                              r"replace an input; give --out a path of its own$"),
    "--out is a file of a checkpoint": (
        ["--out", "runs/tests/tiny_ddpm/unet/diffusion_pytorch_model.safetensors"],
        r"--out runs/tests/tiny_ddpm/unet/diffusion_pytorch_model\.safetensors is a file of the "
        r"checkpoint runs/tests/tiny_ddpm: writing the prior there would replace an input"),
    "--out is a directory": (["--out", "runs/tests"], r"cannot write the prior file \(--out\) "
                             r"runs/tests: it is an existing directory; give the path of a file$"),
    "--min-var nan": (["--out", PRIOR, "--min-var", "nan"], FLOOR + ", got nan$"),
    "--min-var -1": (["--out", PRIOR, "--min-var", "-1"], FLOOR + r", got -1\.0$"),
}


@pytest.mark.parametrize("case", PRIOR_COMMANDS)
def test_a_prior_command_that_would_replace_an_input_or_cannot_floor_is_refused(
        case: str, workspace: Path, reached: Counter, capsys) -> None:
    arguments, message = PRIOR_COMMANDS[case]
    before = written(workspace)
    with pytest.raises(SystemExit) as exit_info:
        main(["prior", *TWO_CHECKPOINTS, *arguments])
    assert exit_info.value.code == 2
    assert re.search("^vdu prior: error: " + message, capsys.readouterr().err, re.MULTILINE)
    stopped_before(reached, "prior built")
    assert nothing_lost(before, workspace) == []


PRIOR_FILES = {
    "CheckpointPrior save_to": (TINY_VDU, {"CheckpointPrior": {
        "checkpoints": TWO_CHECKPOINTS[1:], "save_to": "runs/tests"}}),
    "PriorSnapshot path": (str(CONFIGS / "tests" / "tiny_pretrain.yaml"),
                           {"PriorSnapshot": {"path": "runs/tests", "every_n_steps": 2}}),
}


@pytest.mark.parametrize("what", PRIOR_FILES)
def test_a_prior_file_to_write_that_is_a_directory_is_refused_before_data_are_read(
        what: str, workspace: Path, reached: Counter) -> None:
    config, init_args = PRIOR_FILES[what]
    before = written(workspace)
    with pytest.raises(IsADirectoryError, match=rf"^cannot write the {what} runs/tests: it is "
                                                r"an existing directory; give the path of a "
                                                r"file$"):
        main(["fit", "--config", config, vdu_callbacks(config, **init_args)])
    stopped_before(reached, "data read")
    assert nothing_lost(before, workspace) == []


# ---- 17: a `pretrained` directory that cannot serve -----------------------------------------
def sd_pipeline(workspace: Path) -> str:
    save_tiny_sd(workspace / "runs/tests/sd")
    return "runs/tests/sd"


def ddpm_with_config(**changes: Any) -> Any:
    """A copy of the tiny DDPM whose unet/config.json holds ``changes``."""
    def make(workspace: Path) -> str:
        shutil.copytree(workspace / "runs/tests/tiny_ddpm", workspace / "runs/tests/bad_ddpm")
        config_file = workspace / "runs/tests/bad_ddpm/unet/config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
        return "runs/tests/bad_ddpm"
    return make


def ddpm_with_weights_of_an_attention_block(workspace: Path) -> str:
    make = ddpm_with_config(add_attention=True)
    unet = workspace / "runs/tests/bad_ddpm/unet"
    path = make(workspace)
    UNet2DModel.from_config(json.loads((unet / "config.json").read_text())).save_pretrained(unet)
    config = json.loads((unet / "config.json").read_text())
    (unet / "config.json").write_text(json.dumps({**config, "add_attention": False}))
    return path


def ddpm_with_pickled_weights(workspace: Path) -> str:
    path = ddpm_with_config()(workspace)
    weights = workspace / path / "unet/diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    torch.save({**state, "extra": RunsCode(workspace / "pwned")}, weights.with_suffix(".bin"))
    weights.unlink()
    return path


def ddpm_with_a_config_that_is_not_json(workspace: Path) -> str:
    path = ddpm_with_config()(workspace)
    (workspace / path / "unet/config.json").write_text('{"_class_name": "UNet2DModel",\n')
    return path


WIDTHS = r"\[16, 1, 3, 3\], config \[32, 1, 3, 3\]"
PRETRAINED = {
    "an SD pipeline": (sd_pipeline, r"^runs/tests/sd/unet/config\.json describes a "
                       r"UNet2DConditionModel, not a UNet2DModel: `pretrained` takes a DDPM "
                       r"pipeline directory, a UNet2DModel directory or a DiffusionModule "
                       r"checkpoint\. A Stable Diffusion pipeline is unlearned with "
                       r"TextToImageVDUModule$"),
    "a config.json that is not JSON": (ddpm_with_a_config_that_is_not_json,
                                       r"^runs/tests/bad_ddpm/unet/config\.json is not a JSON "
                                       r"object \(a diffusers config\): Expecting"),
    "a config of other widths": (ddpm_with_config(block_out_channels=[32, 64]),
                                 r"^the weights in runs/tests/bad_ddpm/unet do not fit its "
                                 r"config\.json: \d+ tensors have other shapes, e\.g\. "
                                 rf"\['conv_in\.weight: weights {WIDTHS}'"),
    "a config with an attention block the weights lack": (
        ddpm_with_config(add_attention=True), r"^the weights in runs/tests/bad_ddpm/unet do not "
        r"fit its config\.json: 10 tensors of the configured UNet are not in the weights, e\.g\. "
        r"\['mid_block\.attentions\.0\.group_norm\.bias'"),
    "weights with an attention block the config lacks": (
        ddpm_with_weights_of_an_attention_block, r"^the weights in runs/tests/bad_ddpm/unet do "
        r"not fit its config\.json: 10 tensors of the weights are not in the configured UNet"),
    "pickled weights": (ddpm_with_pickled_weights, r"^refused to load checkpoint runs/tests/"
                        r"bad_ddpm/unet/diffusion_pytorch_model\.bin: it holds objects other "
                        r"than tensors .*\. This project never loads pickled objects\. If you "
                        r"trust the file, convert it to safetensors once: torch\.load\(it, "
                        r"weights_only=False\), then safetensors\.torch\.save_file\(<its UNet "
                        r"tensors>, 'runs/tests/bad_ddpm/unet/diffusion_pytorch_model\."
                        r"safetensors'\)$"),
}


@pytest.mark.parametrize("case", PRETRAINED)
def test_a_pretrained_directory_that_cannot_serve_is_refused_before_data_are_read(
        case: str, workspace: Path, reached: Counter) -> None:
    make, message = PRETRAINED[case]
    pretrained = make(workspace)
    before = written(workspace)
    with pytest.raises(ValueError, match=message):
        main(["fit", "--config", TINY_VDU, f"--model.init_args.pretrained={pretrained}"])
    assert not (workspace / "pwned").exists(), "loading the weights ran the code they carry"
    assert reached["model read"] == 1
    stopped_before(reached, "data read")
    assert nothing_lost(before, workspace) == []


# ---- 18-19: a forget folder reaching outside or holding a bomb; every class forgotten ----
def forget_folder(workspace: Path, case: str) -> None:
    folder = workspace / "forget"
    folder.mkdir()
    for name in ("secret.png", "forget/a.png"):
        Image.new("L", (8, 8), 200).save(workspace / name)
    if case == "a decompression bomb":
        write_decompression_bomb(folder / "bomb.png")
        return
    outside = "../secret.png" if case == "../ in metadata.jsonl" else str(workspace / "secret.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}) + "\n"
                                           + json.dumps({"file_name": outside}) + "\n")


OUTSIDE = (r"^forget/metadata\.jsonl, line 2: file_name '{}' is outside forget: file names are "
           r"paths relative to the folder, inside it \(e\.g\. 'images/0001\.png'\)$")
FORGET_FOLDERS = {
    "../ in metadata.jsonl": OUTSIDE.format(r"\.\./secret\.png"),
    "an absolute path in metadata.jsonl": OUTSIDE.format(r"/\S+/secret\.png"),
    "a decompression bomb": r"^forget/bomb\.png is refused as a possible decompression bomb \(",
}


@pytest.mark.parametrize("case", FORGET_FOLDERS)
def test_a_forget_folder_reaching_outside_or_holding_a_bomb_is_refused_before_data_are_read(
        case: str, workspace: Path, reached: Counter) -> None:
    forget_folder(workspace, case)
    before = written(workspace)
    with pytest.raises(ValueError, match=FORGET_FOLDERS[case]):
        main(["fit", "--config", TINY_VDU, "--data.init_args.forget_classes=null",
              "--data.init_args.forget_folder=forget"])
    stopped_before(reached, "data read")
    assert nothing_lost(before, workspace) == []


def test_forgetting_every_class_is_refused_before_data_are_read(workspace: Path,
                                                                reached: Counter) -> None:
    before = written(workspace)
    with pytest.raises(ValueError, match=r"^forget_classes=\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] names "
                                         r"every class of dataset 'digits': no class is left to "
                                         r"retain \(the retain evaluation needs one\); forget "
                                         r"fewer classes$"):
        main(["fit", "--config", TINY_VDU, f"--data.init_args.forget_classes={list(range(10))}"])
    stopped_before(reached, "data read")
    assert nothing_lost(before, workspace) == []


# ---- 20-22: a run's own checkpoint and arguments ------------------------------------------
@pytest.mark.parametrize("problem", ["truncated", "pickled code"])
def test_a_bad_last_checkpoint_is_refused_before_the_model_is_read(
        problem: str, workspace: Path, reached: Counter) -> None:
    make, error, message = PROBLEMS[problem]
    shutil.move(workspace / make(workspace), workspace / "runs/tests/tiny_vdu/last.ckpt")
    before = written(workspace)
    message = message.replace(r"runs/tests/bad\.ckpt", r"runs/tests/tiny_vdu/last\.ckpt")
    with pytest.raises(error, match="^ckpt_path: " + message):
        main(["fit", "--config", TINY_VDU, "--ckpt_path", "last"])
    assert not (workspace / "pwned").exists(), "loading the checkpoint ran the code it carries"
    stopped_before(reached, "model read")
    assert nothing_lost(before, workspace) == []


@pytest.mark.parametrize("through", ["vdu", "API"])
def test_a_checkpoint_whose_prior_holds_nan_is_named(through: str, workspace: Path,
                                                     reached: Counter) -> None:
    content = load_checkpoint(workspace / "runs/tests/tiny_vdu/last.ckpt")
    var = content["vdu_prior"]["var"]["conv_in.weight"].clone()
    var[0, 0, 0, 0] = math.nan
    content["vdu_prior"]["var"]["conv_in.weight"] = var
    torch.save(content, workspace / "runs/tests/nan_prior.ckpt")
    before = written(workspace)
    message = (r"the checkpoint runs/tests/nan_prior\.ckpt holds a prior \(key 'vdu_prior'\) "
               r"that cannot be used: prior variance of 'conv_in\.weight' holds NaN")
    if through == "vdu":
        with pytest.raises(ValueError, match="^ckpt_path: " + message):
            main(["fit", "--config", TINY_VDU, "--ckpt_path", "runs/tests/nan_prior.ckpt"])
        stopped_before(reached, "model read")
    else:  # the checkpoint is read where Lightning reads it, after the model and the data
        trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             limit_val_batches=0)
        data = ForgetSetDataModule(dataset="digits", forget_classes=[3], forget_size=32,
                                   eval_size=16, batch_size=16)
        with pytest.raises(ValueError, match="^" + message):
            trainer.fit(VDUModule("runs/tests/tiny_ddpm", lr=1e-3), datamodule=data,
                        ckpt_path="runs/tests/nan_prior.ckpt", weights_only=True)
        stopped_before(reached, "training step")
    assert nothing_lost(before, workspace) == []


@pytest.mark.parametrize("lr", ["0", "-1e-3"])
def test_a_learning_rate_that_is_not_positive_is_refused_before_the_model_is_read(
        lr: str, workspace: Path, reached: Counter) -> None:
    before = written(workspace)
    with pytest.raises(ValueError, match=rf"^lr must be a positive, finite learning rate, got "
                                         rf"{float(lr)}$"):
        main(["fit", "--config", TINY_VDU, f"--model.init_args.lr={lr}"])
    stopped_before(reached, "model read")
    assert nothing_lost(before, workspace) == []


# ---- 23: the evaluation classifier ---------------------------------------------------------
@pytest.mark.parametrize("problem, message", [
    ("pickled weights", r"model\.safetensors is not a safetensors file .*the project reads "
                        r"classifier weights only as safetensors"),
    ("foreign key", r"config\.json has keys \['colour'\] that a classifier does not take"),
    ("other width", r"the weights in .*model\.safetensors do not fit its config\.json"),
    ("no standardisation", r"holds a classifier without input standardisation"),
])
def test_a_classifier_directory_that_cannot_serve_is_named_before_any_sampling(
        problem: str, message: str, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = workspace / "runs/tests/tiny_classifier"
    config = json.loads((folder / "config.json").read_text())
    if problem == "pickled weights":
        torch.save({"net.head.1.bias": torch.zeros(10)}, folder / "model.safetensors")
    elif problem == "foreign key":
        config["colour"] = "red"
    elif problem == "other width":
        config["width"] = 16
    else:
        del config["normalise"]
    (folder / "config.json").write_text(json.dumps(config))
    before = written(workspace)
    sampled: list[bool] = []
    monkeypatch.setattr(UnlearningModule, "sample_from",
                        lambda self, *args, **kwargs: sampled.append(True))
    with pytest.raises(ValueError, match=message):
        main(["validate", "--config", TINY_VDU, "--ckpt_path", "runs/tests/tiny_vdu/last.ckpt"])
    assert not sampled, "the models were sampled before the classifier was checked"
    new = nothing_lost(before, workspace)
    assert not [path for path in new if "evaluation" in path], new
