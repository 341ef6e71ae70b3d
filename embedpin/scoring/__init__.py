"""Scoring: batched ꟻLIP and CLIP losses, target loading, per-candidate aggregation."""

from embedpin.scoring.aggregate import WEIGHTINGS, WORST_LOSS, aggregate
from embedpin.scoring.flip import DEFAULT_PPD, FlipReference, flip_loss, pairwise_flip, prepare_reference
from embedpin.scoring.scorer import Scorer, ScoreResult
from embedpin.scoring.targets import load_image, load_targets

__all__ = [
    "DEFAULT_PPD", "FlipReference", "ScoreResult", "Scorer", "WEIGHTINGS", "WORST_LOSS", "aggregate",
    "flip_loss", "load_image", "load_targets", "pairwise_flip", "prepare_reference",
]
