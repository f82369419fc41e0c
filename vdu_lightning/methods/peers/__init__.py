"""The peer methods users compare VDU against (docs/method.md §7), on ``UnlearningModule``.

Each runs on the same pre-trained model, forget set, step budget and metrics as VDU; only
the objective (and, for SalUn, which weights move) differs. ``data_constrained`` is False for
the methods that also train on the retain data D_r. See README.md in this folder.
"""

from vdu_lightning._lazy import lazy_namespace

_NAMES = {
    "EWCModule": "vdu_lightning.methods.peers.ewc",
    "GradientAscentModule": "vdu_lightning.methods.peers.gradient_ascent",
    "IsotropicAnchorModule": "vdu_lightning.methods.peers.anchor",
    "RetainFinetuneModule": "vdu_lightning.methods.peers.retain",
    "SalUnModule": "vdu_lightning.methods.peers.salun",
    "diagonal_fisher": "vdu_lightning.methods.peers.fisher",
    "saliency_mask": "vdu_lightning.methods.peers.salun",
}
__getattr__, __dir__ = lazy_namespace(__name__, _NAMES)
__all__ = sorted(_NAMES)
