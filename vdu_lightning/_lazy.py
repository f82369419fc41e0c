"""Lazy package namespaces and the old import paths of moved modules.

A package ``__init__`` that imported its classes eagerly would load Lightning for a user who
only wants the plain-torch maths (``vdu_lightning.prior``, ``losses``, ``diffusion``): the
packages here name where each public name lives and import it on first access (PEP 562).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any


def lazy_namespace(package: str, names: Mapping[str, str],
                   moved: Mapping[str, str] | None = None
                   ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public ``names`` map to the module
    each is defined in; ``moved`` names still resolve, with a ``DeprecationWarning`` that
    says their new home (one release long)."""
    moved = dict(moved or {})

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            setattr(sys.modules[package], name, value)  # imported once
            return value
        if name in moved:
            warnings.warn(f"{package}.{name} moved to {moved[name]}.{name}; the old name goes "
                          "in the next release", DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(moved[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names})

    return __getattr__, __dir__


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An import hook that answers the old module paths (``{old: new}``) with the modules
    that moved: the same objects, so class paths in old configs, scripts and checkpoints
    keep working, with a ``DeprecationWarning`` naming the new path."""

    def __init__(self, moved: Mapping[str, str]) -> None:
        self.moved = dict(moved)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.moved:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        new = self.moved[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module is the moved one, already imported."""


def install_moved_modules(moved: Mapping[str, str]) -> None:
    """Answer the old paths in ``moved`` from now on (once per process)."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModules(moved))
