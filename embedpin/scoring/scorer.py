"""The run's scorer: one generation's images [λ, B, 3, H, W] -> one loss per candidate.

Built once per run: target ꟻLIP features and CLIP target embeddings are computed here and
reused every generation. Per image, loss = flip_weight·ꟻLIP + clip_weight·CLIP distance.
ꟻLIP is averaged over the target images; the CLIP distance over the target images and,
separately, to the target text, the two then averaged. Without targets (self mode) each
image is compared with the other images of its own candidate's batch (pairwise, so a
low loss means the prompt gives consistent images across seeds; a text target still
applies to the CLIP term). Per-image losses are aggregated by
:func:`embedpin.scoring.aggregate.aggregate`.

With target masks (:mod:`embedpin.scoring.masks`) each target's ignored part is filled
from the render being scored: ꟻLIP compares the render with that filled target and averages
the error under the mask; CLIP compares the two cropped to the mask's bounding box. The
filled targets depend on the render, so their ꟻLIP features and CLIP embeddings are
computed per render (white masks ignore nothing and keep the unmasked, precomputed path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedpin.config import ScoreConfig
from embedpin.errors import ConfigError
from embedpin.models.clip import clip_image_embeds, clip_text_embeds, require_clip
from embedpin.models.components import Components
from embedpin.scoring.aggregate import WORST_LOSS, aggregate
from embedpin.scoring.clip_loss import cosine_distance, pairwise_cosine_distance
from embedpin.scoring.flip import (
    FlipReference,
    flip_cross,
    flip_cross_masked,
    flip_features,
    flip_pairs,
    pairwise_flip,
)
from embedpin.scoring.masks import bounding_box, fill, is_blank


@dataclass
class ScoreResult:
    """``loss`` [λ] (what the optimizer minimises), ``flip`` / ``clip`` [λ] (each term's mean
    over the batch, None when unused), ``per_image`` [λ, B] (weighted per-image losses);
    non-finite values are replaced by ``WORST_LOSS``."""

    loss: torch.Tensor
    flip: torch.Tensor | None
    clip: torch.Tensor | None
    per_image: torch.Tensor


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, WORST_LOSS)


def _batch_mean(x: torch.Tensor) -> torch.Tensor:
    return _finite(x.mean(-1))


def _off_diagonal_mean(pairs: torch.Tensor) -> torch.Tensor:
    """[..., B, B] with zero diagonal -> mean over the other B - 1 images: [..., B]."""
    return pairs.sum(-1) / (pairs.shape[-1] - 1)


class Scorer:
    """Scores generations against fixed targets (images and/or a text) or in self mode.

    The loss weights, weighting, its scale and ppd are a run's ScoreConfig, checked by
    RunConfig.validate (the defaults are its defaults), so they are not checked again here."""

    def __init__(self, components: Components | None, targets: torch.Tensor | None = None,
                 flip_weight: float = ScoreConfig.flip_weight, clip_weight: float = ScoreConfig.clip_weight,
                 text_target: str | None = None, std_weight: float = ScoreConfig.std_weight,
                 hyperbatch_weighting: str = ScoreConfig.weighting,
                 hyperbatch_scale: float = ScoreConfig.weighting_scale, ppd: float = ScoreConfig.ppd,
                 masks: torch.Tensor | None = None):
        if targets is not None and (targets.dim() != 4 or targets.shape[1] != 3 or len(targets) == 0):
            raise ValueError(f"targets must be [T, 3, H, W], got {tuple(targets.shape)}")
        if masks is not None and (targets is None or masks.shape != (len(targets), 1, *targets.shape[-2:])):
            raise ValueError(f"masks must be [T, 1, H, W] for targets {None if targets is None else tuple(targets.shape)}"
                             f", got {tuple(masks.shape)}")
        self.components, self.targets = components, targets
        self.masks = None if is_blank(masks) else masks  # [T, 1, H, W]; None: no pixel ignored
        self.flip_weight, self.clip_weight = float(flip_weight), float(clip_weight)
        self.std_weight, self.weighting, self.scale = float(std_weight), hyperbatch_weighting, float(hyperbatch_scale)
        self.ppd = float(ppd)
        self.flip_ref = flip_features(targets, ppd) if targets is not None and self.masks is None else None
        self.clip_targets: list[torch.Tensor] = []  # [T, D] image and/or [1, D] text embeddings (unmasked)
        if clip_weight > 0:
            require_clip(components)  # fails early, with a ConfigError, when there is no CLIP
            if targets is not None and self.masks is None:
                self.clip_targets.append(clip_image_embeds(components, targets))
            if text_target:
                self.clip_targets.append(clip_text_embeds(components, [text_target]))

    @property
    def self_mode(self) -> bool:
        """Whether some term compares images with their batch-mates (no target for it)."""
        return self.targets is None and (self.flip_weight > 0 or (self.clip_weight > 0 and not self.clip_targets))

    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [λ, B, 3, H, W], got {tuple(images.shape)}")
        if self.targets is not None and images.shape[-2:] != self.targets.shape[-2:]:
            raise ValueError(f"renders are {tuple(images.shape[-2:])} but targets {tuple(self.targets.shape[-2:])}")
        if self.self_mode and images.shape[1] < 2:
            raise ConfigError("self mode (no target images) needs a batch of at least 2 images per candidate")

    def _reference(self, device: torch.device) -> FlipReference:
        ref = self.flip_ref
        if ref.lab.device != device:
            self.flip_ref = ref = FlipReference(ref.lab.to(device), ref.edge.to(device), ref.point.to(device), ref.ppd)
        return ref

    def flip_per_image(self, images: torch.Tensor) -> torch.Tensor:
        """Mean ꟻLIP error [λ, B] of each image to the targets, or to its batch-mates."""
        if self.targets is None:
            return _off_diagonal_mean(pairwise_flip(images, self.ppd))
        flat = images.flatten(0, 1)
        if self.masks is not None:
            return flip_cross_masked(flat, self.targets, self.masks, self.ppd).mean(-1).view(images.shape[:2])
        return flip_cross(flat, self._reference(images.device), self.ppd).mean(-1).view(images.shape[:2])

    def clip_per_image(self, images: torch.Tensor) -> torch.Tensor:
        """Mean CLIP cosine distance [λ, B] to the targets (images, text), or to batch-mates."""
        flat = images.flatten(0, 1)
        terms = [self.clip_masked(flat)] if self.masks is not None else []
        if self.clip_targets or self.targets is None:  # (masked targets embed their own crops)
            embeds = clip_image_embeds(self.components, flat).to(images.device)
            if self.targets is None and not self.clip_targets:
                return _off_diagonal_mean(pairwise_cosine_distance(embeds.view(*images.shape[:2], -1)))
            terms += [cosine_distance(embeds, t) for t in self.clip_targets]
        return torch.stack(terms).mean(0).view(images.shape[:2])

    def clip_masked(self, images: torch.Tensor) -> torch.Tensor:
        """Mean CLIP cosine distance [N] of images [N, 3, H, W] to the masked targets: per target,
        the images and the target filled from each of them, both cropped to the mask's bounding
        box (one slice for the whole batch), then embedded as CLIP preprocesses any image. A mask
        white all over its box (a rectangle) needs no fill: the target's crop is embedded once."""
        terms = []
        for target, mask in zip(self.targets, self.masks):
            rows, cols = bounding_box(mask)
            crop, m = images[..., rows, cols], mask[..., rows, cols]
            filled = target[None, :, rows, cols] if bool((m >= 1).all()) else fill(target[:, rows, cols], crop, m)
            pair = clip_image_embeds(self.components, torch.cat((crop, filled.to(crop)))).to(images.device)
            terms.append(1 - (pair[:len(crop)] * pair[len(crop):]).sum(-1))
        return torch.stack(terms).mean(0)

    def __call__(self, images: torch.Tensor, lineage: torch.Tensor | None = None,
                 roots: torch.Tensor | None = None) -> ScoreResult:
        """images [λ, B, 3, H, W] sRGB in [0, 1], lineage [B, depth] and roots [B] (or None;
        ``RenderResult.roots``) -> ScoreResult."""
        self._check(images)
        flip = self.flip_per_image(images).float() if self.flip_weight > 0 else None
        clip = self.clip_per_image(images).float() if self.clip_weight > 0 else None
        per_image = sum(w * t for w, t in ((self.flip_weight, flip), (self.clip_weight, clip)) if t is not None)
        loss = aggregate(per_image, lineage, self.std_weight, self.weighting, self.scale, roots)
        return ScoreResult(loss=loss, flip=None if flip is None else _batch_mean(flip),
                           clip=None if clip is None else _batch_mean(clip), per_image=_finite(per_image))

    def error_maps(self, images: torch.Tensor) -> torch.Tensor:
        """ꟻLIP error maps [N, H, W] in [0, 1] of images [N, 3, H, W]: mean over the targets,
        or (self mode) over the other given images."""
        if self.masks is not None:
            return flip_cross_masked(images, self.targets, self.masks, self.ppd, return_maps=True).mean(1)
        if self.flip_ref is not None:
            return flip_cross(images, self._reference(images.device), self.ppd, return_maps=True).mean(1)
        n, dev = len(images), images.device
        if n < 2:
            raise ConfigError("self-mode error maps need at least 2 images")
        i, j = torch.triu_indices(n, n, 1, device=dev)
        feats = flip_features(images, self.ppd)
        maps = flip_pairs(feats, feats, i, j, True)
        total = maps.new_zeros(n, *maps.shape[-2:]).index_add_(0, i, maps).index_add_(0, j, maps)
        return total / (n - 1)
