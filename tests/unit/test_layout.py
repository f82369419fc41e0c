"""The package's shape: plain-torch maths that loads no Lightning, old import paths that
still work (with a warning), ``@override`` on every hook a class overrides, and one folder
per method with a README that points to files that exist."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

import vdu_lightning
from conftest import REPO

#: The modules that promise plain torch (design: modules, callbacks and the CLI compose them).
PLAIN_TORCH = [
    "vdu_lightning", "vdu_lightning.prior", "vdu_lightning.losses", "vdu_lightning.diffusion",
    "vdu_lightning.fsdp", "vdu_lightning.metrics", "vdu_lightning.evaluation",
    "vdu_lightning.methods.vdu.objective", "vdu_lightning.methods.sfd.score_distillation",
    "vdu_lightning.methods.sfd.one_step", "vdu_lightning.methods.peers.fisher",
]


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_importing_the_maths_leaves_lightning_out() -> None:
    # All at once in one fresh process: what one import loads, importing all of them loads too.
    loaded = json.loads(run_python(
        f"import json, sys, {', '.join(PLAIN_TORCH)}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning'))))"))
    assert loaded == [], f"importing the plain-torch modules loads {loaded[:5]}"


def test_the_public_names_resolve_lazily_and_are_listed() -> None:
    for name in vdu_lightning.__all__:
        assert getattr(vdu_lightning, name) is not None
    assert set(vdu_lightning.__all__) <= set(dir(vdu_lightning))
    assert issubclass(vdu_lightning.VDUModule, vdu_lightning.PriorPenaltyModule)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchModule'"):
        vdu_lightning.NoSuchModule  # noqa: B018


OLD_PATHS = {
    "vdu_lightning.modules.vdu": ("VDUModule", "vdu_lightning.methods.vdu.module"),
    # The package before its module: importing the module imports the package first.
    "vdu_lightning.modules.peers": ("SalUnModule", "vdu_lightning.methods.peers"),
    "vdu_lightning.modules.peers.ewc": ("EWCModule", "vdu_lightning.methods.peers.ewc"),
    "vdu_lightning.fisher": ("diagonal_fisher", "vdu_lightning.methods.peers.fisher"),
    "vdu_lightning.modules.sfd": ("SFDModule", "vdu_lightning.methods.sfd.module"),
    "vdu_lightning.one_step": ("OneStepGeneratorPipeline", "vdu_lightning.methods.sfd.one_step"),
    "vdu_lightning.pipelines": ("load_pipeline", "vdu_lightning.methods.text_to_image.pipelines"),
    "vdu_lightning.callbacks.text_to_image": (
        "TextToImageEvaluation", "vdu_lightning.methods.text_to_image.evaluation"),
}


def test_the_old_import_paths_give_the_same_objects_and_warn() -> None:
    # A fresh process: this one may have imported the old paths already.
    out = json.loads(run_python(
        "import importlib, json, warnings\n"
        f"found = {{}}\n"
        f"for old, (name, new) in {OLD_PATHS!r}.items():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module(old)\n"
        "    same = getattr(module, name) is getattr(importlib.import_module(new), name)\n"
        "    found[old] = [same, [str(w.message) for w in caught\n"
        "                         if w.category is DeprecationWarning]]\n"
        "print(json.dumps(found))"))
    for old, (_, new) in OLD_PATHS.items():
        same, warned = out[old]
        assert same, f"{old} is not the module {new}"
        assert any(f"{old} moved to {new}" in message for message in warned), (old, warned)


def test_a_moved_name_of_a_package_warns_and_resolves() -> None:
    import vdu_lightning.modules

    with pytest.warns(DeprecationWarning, match="vdu_lightning.modules.VDUModule moved to "
                                                "vdu_lightning.methods.vdu.VDUModule"):
        moved = vdu_lightning.modules.VDUModule
    assert moved is vdu_lightning.VDUModule


#: The Lightning classes whose hooks the project's classes override.
BASES = (pl.LightningModule, pl.LightningDataModule, pl.Callback, torch.nn.Module)


def project_classes() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(vdu_lightning.__path__, "vdu_lightning."):
        if info.name in {"vdu_lightning.__main__"}:
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, BASES):
                found.append(cls)
    return found


def test_every_overridden_lightning_hook_says_override() -> None:
    library = [b for root in BASES for b in root.__mro__
               if b.__module__.split(".")[0] in ("lightning", "torch")]
    missing = []
    for cls in project_classes():
        for name, value in vars(cls).items():
            if name.startswith("__") or not callable(value):
                continue
            overridden = any(name in vars(base) for base in library)
            if overridden and not getattr(value, "__override__", False):
                missing.append(f"{cls.__module__}.{cls.__name__}.{name}")
    assert not missing, f"overridden without @override: {missing}"


@pytest.mark.parametrize("folder", ["vdu", "peers", "sfd", "text_to_image"])
def test_each_method_folder_has_a_readme_whose_paths_exist(folder: str) -> None:
    readme = REPO / "vdu_lightning" / "methods" / folder / "README.md"
    text = readme.read_text()
    paths = re.findall(r"`((?:configs|docs|vdu_lightning|benchmarks)/[^`\s]+)`", text)
    assert any(p.startswith("configs/") for p in paths), "name the method's config"
    assert any(p.startswith("docs/") for p in paths), "name the method's guide"
    missing = [p for p in paths if not (REPO / p.split("#")[0]).exists()]
    assert not missing, f"{readme} names missing paths: {missing}"


def test_the_readme_layout_names_every_package_folder() -> None:
    section = REPO.joinpath("README.md").read_text().split("## Layout", 1)[1].split("\n## ")[0]
    folders = [p.relative_to(REPO).as_posix() + "/" for p in (REPO / "vdu_lightning").rglob("*")
               if p.is_dir() and (p / "__init__.py").exists()]
    missing = [f for f in folders if f"`{f}`" not in section]
    assert not missing, f"the README's layout section does not name {missing}"
