"""Target masks: which part of a target the loss pins (white), ignores (black), or weighs
in between (grey).

A mask m [1, H, W] in [0, 1] is resized with its target (the same shorter-side resize and
centre crop to the render size). The ignored part of the target is filled from the render
being scored, ``target' = m·target + (1 - m)·render``, so it adds no error there and no
error leaks from it through ꟻLIP's spatial filters or into CLIP's view; ꟻLIP's error map is
then averaged under the mask, ``Σ m·err / Σ m`` per image. CLIP sees target' and the render
cropped to the mask's bounding box (pixels with m > 0), one box per target shared by every
render, so the crop stays one batched slice.

Beyond the loss, whatever reads a target (guide images, the init word's ranking, the run folder's
copy the report shows) reads :func:`readable_targets`: the ignored part replaced by a fixed grey,
so what is black in a mask has no influence on anything a run does or reports. A target with
transparency and no ``--mask`` has its alpha as its mask (:func:`target_masks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from embedpin.errors import ConfigError
from embedpin.images import load_alpha, load_image, resize_crop
from embedpin.scoring.targets import expand_paths

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
SNAP = 0.5 / 255  # half an 8-bit level: closer to black or white than this is black or white
FILL = 0.5  # what a target's ignored part reads as outside the loss: mid grey, whatever the target has there


@dataclass(frozen=True)
class Masks:
    """``masks`` [T, 1, H, W] in [0, 1], one per target (a single mask repeated), and the notes
    on how they were read (stderr, the report)."""

    masks: torch.Tensor
    notes: list[str]


def read_mask(path: str | Path) -> torch.Tensor:
    """A mask file -> float32 [1, h, w] in [0, 1]: its luminance (alpha composited on white,
    as every image is read; an unreadable file is an InputError like a target's)."""
    rgb = load_image(path)
    return snap(torch.einsum("c,chw->hw", rgb.new_tensor(LUMA), rgb)[None])


def snap(mask: torch.Tensor) -> torch.Tensor:
    """Values within :data:`SNAP` of 0 or 1 set to exactly 0 or 1: white stays white through
    rounding (the luminance weights, a bicubic resize) and resampling ringing does not widen
    the mask's bounding box."""
    mask = torch.where(mask < SNAP, 0.0, mask)
    return torch.where(mask > 1 - SNAP, 1.0, mask)


def check_count(masks: int, targets: int) -> None:
    """0 masks, 1 for all targets, or one per target; else a ConfigError."""
    if masks and not targets:
        raise ConfigError("--mask needs --target: a mask selects the part of a target image to pin")
    if masks not in (0, 1, targets):
        raise ConfigError(f"give one --mask for all targets or one per target, in target order "
                          f"(got {masks} masks for {targets} targets)")


def load_masks(paths: Sequence[str | Path], targets: Sequence[str | Path], size: tuple[int, int]) -> Masks:
    """Mask files for the target files/folders ``targets`` -> :class:`Masks` at ``size`` = (H, W).

    Each mask goes through the targets' resize (:func:`embedpin.images.resize_crop`); one whose
    size differs from its target's is resized all the same, with a note. A mask that ignores
    the whole image (all black after resizing) is a ConfigError. Values are snapped to black and
    white (:func:`snap`)."""
    files = expand_paths(targets)
    check_count(len(paths), len(files))
    raw = [read_mask(p) for p in paths]
    out, notes = [], []
    for i, f in enumerate(files):
        j = i if len(raw) > 1 else 0
        mask = snap(resize_crop(raw[j], size))
        if float(mask.sum()) <= 0:
            raise ConfigError(f"mask {paths[j]} ignores the whole image")
        th, tw = load_image(f).shape[-2:]
        h, w = raw[j].shape[-2:]
        if (h, w) != (th, tw):
            notes.append(f"mask {Path(paths[j]).name} resized from {w}x{h} to the render size {size[1]}x{size[0]} "
                         f"(its target {Path(f).name} is {tw}x{th})")
        out.append(mask)
    return Masks(torch.stack(out), list(dict.fromkeys(notes)))


def target_masks(paths: Sequence[str | Path], targets: Sequence[str | Path], size: tuple[int, int]) -> Masks | None:
    """The run's masks at ``size``: the ``--mask`` files (:func:`load_masks`); without any, each
    target's transparency (alpha: opaque pinned, transparent ignored; white for an opaque target),
    said in a note; None when no target has transparency."""
    if paths:
        return load_masks(paths, targets, size)
    files = expand_paths(targets)
    alphas = [load_alpha(f) for f in files]
    if all(a is None for a in alphas):
        return None
    out = []
    for f, alpha in zip(files, alphas):
        mask = torch.ones(1, *size) if alpha is None else snap(resize_crop(alpha, size))
        if float(mask.sum()) <= 0:
            raise ConfigError(f"target {f} is transparent everywhere: nothing of it to pin")
        out.append(mask)
    names = ", ".join(f.name for f, a in zip(files, alphas) if a is not None)
    return Masks(torch.stack(out), [f"{names}: transparency is the mask (transparent parts are ignored, as black in "
                                    f"a --mask; --mask overrides it)"])


def readable_targets(targets: torch.Tensor | None, masks: torch.Tensor | None) -> torch.Tensor | None:
    """The targets [T, 3, H, W] as a run may read them beyond its loss: each one's ignored part
    (mask 0) replaced by :data:`FILL`, a grey that does not depend on the target, grey mask values
    blending the two; exactly the targets where the mask is 1, and without masks."""
    if targets is None or masks is None:
        return targets
    m = masks.to(targets)
    return m * targets + (1 - m) * FILL


def fill(target: torch.Tensor, render: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``m·target + (1 - m)·render``: target [..., 3, H, W] with its ignored part taken from
    render [N, 3, H, W] (mask [1, H, W]) -> [N, 3, H, W]; exactly the target where m = 1."""
    m = mask.to(render)
    return m * target.to(render) + (1 - m) * render


def masked_mean(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ m·err / Σ m`` of error maps [N, H, W] under mask [1, H, W] (or [H, W]): [N]."""
    m = mask.to(maps).reshape(maps.shape[-2:])
    return (maps * m).sum((-2, -1)) / m.sum()


def bounding_box(mask: torch.Tensor) -> tuple[slice, slice]:
    """Rows and columns (slices) of the smallest box holding every pixel with m > 0 of mask
    [..., H, W] (all of it where nothing is > 0)."""
    on = mask.reshape(-1, *mask.shape[-2:]).amax(0) > 0
    rows, cols = on.any(-1).nonzero(), on.any(-2).nonzero()
    if len(rows) == 0:
        return slice(None), slice(None)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def is_blank(masks: torch.Tensor | None) -> bool:
    """Whether ``masks`` ignore nothing (None, or white everywhere): the unmasked losses apply."""
    return masks is None or bool((masks >= 1).all())
