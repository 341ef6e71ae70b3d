"""The driver's view of a run: everything the run loop needs except the model.

The run loop keeps the optimizer, every render seed, the run store and the reports; the model
lives with the evaluator (in this process or in Ray workers, ``evaluation.evaluate``). From the
evaluator's :class:`~embedpin.evaluation.batch.RunInfo` and the config, :class:`RunSetup` rebuilds
the search space (from its JSON description), the render plans with their seeds (the same
functions a ``Session`` uses), and loads the targets, their masks and guide images itself (for the run folder
and the report's ꟻLIP error maps, computed from the uint8 images the evaluator returns with a
ꟻLIP-only scorer that needs no model).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from embedpin.config import RunConfig
from embedpin.evaluation.batch import RunInfo
from embedpin.evaluation.session import guide_images, render_plan, search_plan, validation_plan
from embedpin.images import load_image
from embedpin.optimizer.space import SearchSpace
from embedpin.render.sampler import RenderPlan
from embedpin.scoring.masks import readable_targets, target_masks
from embedpin.scoring.scorer import Scorer
from embedpin.scoring.targets import expand_paths, load_targets
from embedpin.store import file_digest, target_file


@dataclass
class RunSetup:
    """A run's recipe, search space, render plans and targets (CPU, at the render size; None in
    self mode); ``device``: where the error maps are computed."""

    config: RunConfig
    info: RunInfo
    space: SearchSpace
    plan: RenderPlan                # generation 0's search renders
    validation: RenderPlan | None   # the validation renders (None: validation off)
    targets: torch.Tensor | None
    device: str = "cpu"
    masks: torch.Tensor | None = None  # [T, 1, H, W], one per target (None: no --mask)

    @classmethod
    def make(cls, info: RunInfo, device: str = "cpu") -> RunSetup:
        """From the evaluator's ``info``; its config (the model's defaults filled in) is the run's."""
        config = RunConfig.from_dict(info.config)
        plan = render_plan(config)
        size = (plan.height, plan.width)
        targets = load_targets(config.score.targets, size) if config.score.targets else None
        masks = target_masks(config.score.masks, config.score.targets, size) if config.score.targets else None
        return cls(config, info, SearchSpace.from_dict(info.space), plan, validation_plan(config, plan), targets,
                   device, masks.masks if masks else None)

    def search_plan(self, generation: int) -> RenderPlan:
        return search_plan(self.config, self.plan, generation)

    def files(self) -> dict[str, torch.Tensor]:
        """The images a new run folder starts with (``store.target_file``): targets as the run reads
        them beyond its loss (``scoring.masks.readable_targets``), their masks and guide images."""
        seen = readable_targets(self.targets, self.masks)
        targets = seen if seen is not None else []
        masks = self.masks if self.masks is not None else []
        guide = guide_images(self.config, [load_image(g) for g in self.config.prompt.guide], seen, self.info.towers > 0)
        return {**{target_file(i): t for i, t in enumerate(targets)},
                **{target_file(i, "mask"): m for i, m in enumerate(masks)},
                **{target_file(i, "guide"): g for i, g in enumerate(guide)}}

    @cached_property
    def _flip(self) -> Scorer:
        return Scorer(None, self.targets.to(self.device), flip_weight=1.0, clip_weight=0.0,
                      ppd=self.config.score.ppd, masks=None if self.masks is None else self.masks.to(self.device))

    def error_maps(self, images: np.ndarray) -> np.ndarray | None:
        """ꟻLIP error maps [B, H, W] in [0, 1] of uint8 images [B, H, W, 3] against the targets
        (None in self mode: nothing to compare with)."""
        if self.targets is None:
            return None
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        return self._flip.error_maps(x).float().clamp(0, 1).cpu().numpy()


def input_digests(config: RunConfig) -> dict[str, str | None]:
    """The SHA-256 of every file the run reads its inputs from (targets, a target folder's images,
    masks, guide and init images, an init embedding), by path; None for one that is gone."""
    score, prompt = config.score, config.prompt
    files = [*(expand_paths(score.targets) if score.targets else []), *score.masks, *prompt.guide,
             *(p for p in (prompt.init_image, config.search.init_embedding) if p)]
    return {str(f): file_digest(f) for f in files}
