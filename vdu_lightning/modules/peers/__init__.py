"""The peer methods users compare VDU against (method.md §7), on ``UnlearningModule``.

Each runs on the same pre-trained model, forget set, step budget and metrics as VDU; only
the objective (and, for SalUn, which weights move) differs. ``data_constrained`` is False for
the methods that also train on the retain data D_r.
"""

from vdu_lightning.modules.peers.anchor import IsotropicAnchorModule
from vdu_lightning.modules.peers.ewc import EWCModule
from vdu_lightning.modules.peers.gradient_ascent import GradientAscentModule
from vdu_lightning.modules.peers.retain import RetainFinetuneModule
from vdu_lightning.modules.peers.salun import SalUnModule

__all__ = ["EWCModule", "GradientAscentModule", "IsotropicAnchorModule",
           "RetainFinetuneModule", "SalUnModule"]
