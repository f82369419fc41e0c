"""Variational Diffusion Unlearning: ``VDUModule`` (``module.py``) and the plain-torch maths
of its forget term (``objective.py``). See README.md in this folder."""

from vdu_lightning._lazy import lazy_namespace

_NAMES = {
    "VDUModule": "vdu_lightning.methods.vdu.module",
    "hinged_error": "vdu_lightning.methods.vdu.objective",
    "per_example_error": "vdu_lightning.methods.vdu.objective",
}
__getattr__, __dir__ = lazy_namespace(__name__, _NAMES)
__all__ = sorted(_NAMES)
