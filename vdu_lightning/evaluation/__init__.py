"""The unlearning evaluation in plain torch: evaluators, paired comparison, likelihood,
controls and pictures (docs/method.md §4). No Lightning here: ``UnlearningEvaluation``, the demo
and the benchmarks compose these pieces, so every evaluation path measures the same way.
"""

from vdu_lightning.evaluation.classifier import (
    ClassifierNet,
    load_classifier,
    save_classifier,
    standardise,
)
from vdu_lightning.evaluation.controls import haze_control, perfect_forgetter_control
from vdu_lightning.evaluation.grid import before_after_grid
from vdu_lightning.evaluation.likelihood import Likelihood, likelihood_change, variational_bound
from vdu_lightning.evaluation.paired import PairedEvaluation

__all__ = [
    "ClassifierNet",
    "Likelihood",
    "PairedEvaluation",
    "before_after_grid",
    "haze_control",
    "likelihood_change",
    "load_classifier",
    "perfect_forgetter_control",
    "save_classifier",
    "standardise",
    "variational_bound",
]
