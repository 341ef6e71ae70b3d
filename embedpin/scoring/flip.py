"""LDR-ꟻLIP in torch, batched: Andersson et al. 2020, "FLIP: A Difference Evaluator for
Alternating Images" (HPG 2020), following NVIDIA's reference implementation (the
``flip-evaluator`` package): separable filters, edge-clamped borders, float32 maths.

Everything ꟻLIP does to one image alone (colour transform, contrast-sensitivity
filtering, edge and point detection) is independent of the other image, so it is done
once per image (:func:`flip_features`); a target's features are prepared once per run
(:class:`FlipReference`) and only the cheap per-pair combination runs per render.
The metric is symmetric: flip(a, b) == flip(b, a).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embedpin.config import FLIP_PPD
from embedpin.scoring.color import (
    hyab,
    linear_to_hunt_lab,
    linear_to_ycxcz,
    max_hunt_hyab,
    srgb_to_linear,
    ycxcz_to_linear,
)
from embedpin.scoring.masks import fill, masked_mean

DEFAULT_PPD = FLIP_PPD  # one definition, in embedpin.config
QC, PC, PT, GW, QF = 0.7, 0.4, 0.95, 0.082, 0.5  # FLIP's constants (paper, Table 1)
# Contrast sensitivity Gaussians (a, b) per opponent channel: Y, Cx, and Cz's two lobes.
CSF = ((1.0, 0.0047), (1.0, 0.0053), (34.1, 0.04), (13.5, 0.025))
PIXEL_BUDGET = 1 << 23  # channel-pixels per chunk: bounds peak memory on big batches
BLOCK = 64  # block length of the Toeplitz matmul filtering of long lines
DENSE_MAX = 128  # lines up to this length are filtered with one dense band matrix
_CMAX = max_hunt_hyab() ** QC


@dataclass(frozen=True)
class FlipReference:
    """Per-image ꟻLIP features of N images, computed once: ``lab`` [N, 3, H, W] (filtered,
    Hunt-adjusted Lab), ``edge`` and ``point`` [N, H, W] feature magnitudes."""

    lab: torch.Tensor
    edge: torch.Tensor
    point: torch.Tensor
    ppd: float

    @classmethod
    def from_images(cls, images: torch.Tensor, ppd: float = DEFAULT_PPD) -> FlipReference:
        """images [N, 3, H, W] sRGB in [0, 1]."""
        return flip_features(images, ppd)

    def __len__(self) -> int:
        return self.lab.shape[0]

    def __getitem__(self, idx) -> FlipReference:
        return FlipReference(self.lab[idx], self.edge[idx], self.point[idx], self.ppd)


prepare_reference = FlipReference.from_images


def spatial_kernels(ppd: float) -> torch.Tensor:
    """1-D CSF kernels [4, 2r+1] for Y, Cx, Cz lobe 1, Cz lobe 2 (FLIP eq. 2, separated)."""
    b_max = max(b for _, b in CSF)
    r = math.ceil(3 * math.sqrt(b_max / (2 * math.pi**2)) * ppd)
    x2 = ((torch.arange(-r, r + 1, dtype=torch.float64) / ppd) ** 2)[None]
    a, b = torch.tensor(CSF, dtype=torch.float64).T[..., None]
    amp = a * torch.sqrt(math.pi / b)
    amp[2:] = amp[2:].sqrt()  # Cz is a sum of two separable lobes: sqrt amplitude per axis
    g = amp * torch.exp(-math.pi**2 * x2 / b)
    g[:2] /= g[:2].sum(-1, keepdim=True)
    g[2:] /= g[2:].sum(-1).square().sum().sqrt()  # the two Cz lobes' 2-D sum is 1
    return g


def feature_kernels(ppd: float) -> torch.Tensor:
    """1-D Gaussian, 1st and 2nd derivative kernels [3, 2r+1] (FLIP Sec. 4.2); derivative
    kernels' positive and negative weights sum to +1 and -1."""
    sd = 0.5 * GW * ppd
    r = math.ceil(3 * sd)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * sd**2))
    dg, ddg = -x * g, (x**2 / sd**2 - 1) * g

    def signed_norm(k: torch.Tensor) -> torch.Tensor:
        return torch.where(k > 0, k / k.clamp(min=0).sum(), k / (-k).clamp(min=0).sum())

    return torch.stack((g / g.sum(), signed_norm(dg), signed_norm(ddg)))


def _band(kernels: torch.Tensor, size: int) -> torch.Tensor:
    """Matrices [C, size, size] of 1-D correlations over ``size`` samples, clamped borders
    folded in: out[dst] = sum_src x[src] M[src, dst]."""
    k = kernels.shape[-1]
    src = (torch.arange(size, device=kernels.device)[:, None] + torch.arange(k, device=kernels.device)
           - k // 2).clamp(0, size - 1)
    return torch.einsum("ck,dks->csd", kernels, F.one_hot(src, size).to(kernels))


def _toeplitz(kernels: torch.Tensor, block: int) -> torch.Tensor:
    """Banded matrices [C, block + K - 1, block]: one block of a 1-D correlation as a matmul."""
    k = kernels.shape[-1]
    t = torch.arange(block + k - 1, device=kernels.device)[:, None] - torch.arange(block, device=kernels.device)
    return torch.where((t >= 0) & (t < k), kernels[:, t.clamp(0, k - 1)], 0)


def _filter(x: torch.Tensor, kernels: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-channel 1-D correlation of [N, C, H, W] along dim -1 or -2, borders clamped.

    Done as matmuls (several times faster on CPU than depthwise convolutions): with one
    dense band matrix per channel for short lines, else block-wise with one banded
    Toeplitz matrix per channel on the edge-padded lines."""
    k, size = kernels.shape[-1], x.shape[dim]
    kernels = kernels.to(x)
    if size <= DENSE_MAX:
        band = _band(kernels, size)
        if dim == -1:
            return torch.einsum("nchw,cwv->nchv", x, band)
        return torch.matmul(band.transpose(-1, -2), x)
    n_blocks = -(-size // BLOCK)
    pad = (k // 2, n_blocks * BLOCK - size + k // 2)
    padded = F.pad(x, (*pad, 0, 0) if dim == -1 else (0, 0, *pad), mode="replicate")
    windows = padded.unfold(dim, BLOCK + k - 1, BLOCK)  # [..., n_blocks, ..., window]
    toeplitz = _toeplitz(kernels, BLOCK)
    if dim == -1:
        return torch.einsum("nchbk,ckj->nchbj", windows, toeplitz).flatten(-2)[..., :size]
    return torch.einsum("ncbwk,ckj->ncbjw", windows, toeplitz).flatten(2, 3)[:, :, :size]


def _features(images: torch.Tensor, ppd: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ycxcz = linear_to_ycxcz(srgb_to_linear(images.clamp(0, 1)))
    sk = spatial_kernels(ppd)
    four = _filter(_filter(ycxcz[:, [0, 1, 2, 2]], sk, -1), sk, -2)  # Cz once per CSF lobe
    filtered = torch.cat((four[:, :2], four[:, 2:].sum(1, keepdim=True)), 1)
    lab = linear_to_hunt_lab(ycxcz_to_linear(filtered).clamp(0, 1))
    fk = feature_kernels(ppd)
    gx = _filter((ycxcz[:, :1] + 16) / 116, fk, -1)  # luminance in [0, 1]: g, dg, ddg along x
    d = _filter(gx[:, [1, 2, 0, 0]], fk[[0, 0, 1, 2]], -2)  # dx, ddx, dy, ddy
    return lab, torch.hypot(d[:, 0], d[:, 2]), torch.hypot(d[:, 1], d[:, 3])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _chunk(per_item: int) -> int:
    """Items per chunk when each item holds ``per_item`` channel-pixels."""
    return max(1, PIXEL_BUDGET // max(1, per_item))


def flip_features(images: torch.Tensor, ppd: float = DEFAULT_PPD) -> FlipReference:
    """The per-image half of ꟻLIP for images [N, 3, H, W] sRGB in [0, 1], chunked."""
    x = images.to(_compute_dtype(images))
    step = _chunk(12 * x.shape[-1] * x.shape[-2])
    parts = [_features(x[i:i + step], ppd) for i in range(0, len(x), step)]
    return FlipReference(*(torch.cat(p) for p in zip(*parts)), ppd=float(ppd))


def _combine(t: FlipReference, r: FlipReference) -> torch.Tensor:
    """Error maps [..., H, W] of two (broadcastable) feature sets (FLIP eqs. 5-8)."""
    dc = hyab(t.lab, r.lab) ** QC
    pcc = PC * _CMAX
    dc = torch.where(dc < pcc, dc * (PT / pcc), PT + (dc - pcc) / (_CMAX - pcc) * (1 - PT))
    df = torch.maximum((t.edge - r.edge).abs(), (t.point - r.point).abs())
    df = (df / math.sqrt(2)) ** QF
    return dc ** (1 - df)


def _as_reference(reference: torch.Tensor | FlipReference, ppd: float | None) -> FlipReference:
    """Prepared features of the reference; ``ppd`` None means the prepared one's (or 67.02)."""
    if isinstance(reference, FlipReference):
        if ppd is not None and not math.isclose(reference.ppd, ppd, rel_tol=1e-6):
            raise ValueError(f"reference prepared at {reference.ppd} ppd, scoring at {ppd} ppd")
        return reference
    return flip_features(reference, DEFAULT_PPD if ppd is None else ppd)


def _expand(f: FlipReference, dim: int) -> FlipReference:
    return FlipReference(f.lab.unsqueeze(dim), f.edge.unsqueeze(dim), f.point.unsqueeze(dim), f.ppd)


def flip_pairs(test: FlipReference, ref: FlipReference, ti: torch.Tensor, ri: torch.Tensor,
               return_maps: bool = False) -> torch.Tensor:
    """Mean error [P] (or maps [P, H, W]) of the pairs (test[ti[p]], ref[ri[p]]), chunked."""
    hw = test.lab.shape[-2:]
    step = _chunk(8 * hw[0] * hw[1])
    out = [_combine(test[ti[i:i + step]], ref[ri[i:i + step]]) for i in range(0, len(ti), step)]
    out = out if return_maps else [m.mean((-2, -1)) for m in out]
    return torch.cat(out) if out else test.lab.new_zeros((0, *hw) if return_maps else (0,))


def flip_loss(test: torch.Tensor, reference: torch.Tensor | FlipReference, ppd: float | None = None,
              return_maps: bool = False):
    """LDR-ꟻLIP of test [N, 3, H, W] against reference [N or 1, 3, H, W] (or prepared), both
    sRGB in [0, 1], at ``ppd`` pixels per degree (default: the prepared reference's, else
    flip-evaluator's 67.02). Returns the mean error per image [N] in [0, 1] (and maps
    [N, H, W])."""
    ref = _as_reference(reference, ppd)
    if len(ref) not in (1, len(test)) or ref.lab.shape[-2:] != test.shape[-2:]:
        raise ValueError(f"reference {tuple(ref.lab.shape)} does not match test {tuple(test.shape)}")
    feats = flip_features(test, ref.ppd)
    step = _chunk(8 * test.shape[-1] * test.shape[-2])
    maps = torch.cat([_combine(feats[i:i + step], ref if len(ref) == 1 else ref[i:i + step])
                      for i in range(0, len(test), step)])
    mean = maps.mean((-2, -1)).to(test.dtype)
    return (mean, maps.to(test.dtype)) if return_maps else mean


def flip_cross(test: torch.Tensor, reference: torch.Tensor | FlipReference,
               ppd: float | None = None, return_maps: bool = False) -> torch.Tensor:
    """Mean ꟻLIP error [N, T] of every test image [N, 3, H, W] against every reference [T]
    (or error maps [N, T, H, W]); ``ppd`` as in :func:`flip_loss`."""
    ref = _as_reference(reference, ppd)
    feats = flip_features(test, ref.ppd)
    step = _chunk(8 * len(ref) * test.shape[-1] * test.shape[-2])
    out = [_combine(_expand(feats[i:i + step], 1), _expand(ref, 0)) for i in range(0, len(test), step)]
    out = torch.cat(out if return_maps else [m.mean((-2, -1)) for m in out])
    return out.to(test.dtype)


def flip_cross_masked(test: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, ppd: float = DEFAULT_PPD,
                      return_maps: bool = False) -> torch.Tensor:
    """Masked ꟻLIP [N, T] of every test image [N, 3, H, W] against every target [T, 3, H, W]
    under its mask [T, 1, H, W] (:mod:`embedpin.scoring.masks`): per pair, the target's
    ignored part is filled from the test image and the error map averaged under the mask;
    with ``return_maps`` the weighted maps m·err [N, T, H, W]. The filled targets depend on
    the test image, so their features are computed per pair (chunks of test images bound
    the memory)."""
    step = _chunk(12 * (1 + len(targets)) * test.shape[-1] * test.shape[-2])
    out = []
    for i in range(0, len(test), step):
        part = test[i:i + step]
        feats = flip_features(part, ppd)
        cols = []
        for target, mask in zip(targets, masks):
            maps = _combine(feats, flip_features(fill(target, part, mask), ppd))
            cols.append(maps * mask.to(maps) if return_maps else masked_mean(maps, mask))
        out.append(torch.stack(cols, 1))
    return torch.cat(out).to(test.dtype)


def pairwise_flip(images: torch.Tensor, ppd: float = DEFAULT_PPD) -> torch.Tensor:
    """Symmetric matrix of mean ꟻLIP errors among images [..., B, 3, H, W]: [..., B, B] with a
    zero diagonal; each unordered pair of each group is evaluated once, in batched calls."""
    lead, b = images.shape[:-4], images.shape[-4]
    feats = flip_features(images.reshape(-1, *images.shape[-3:]), ppd)
    i, j = torch.triu_indices(b, b, 1, device=images.device)
    base = (torch.arange(math.prod(lead), device=images.device) * b)[:, None]
    err = flip_pairs(feats, feats, (base + i).flatten(), (base + j).flatten())
    out = err.new_zeros(math.prod(lead), b, b)
    out[:, i, j] = err.view(-1, len(i))
    return (out + out.transpose(-1, -2)).view(*lead, b, b).to(images.dtype)
