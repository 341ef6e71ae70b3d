"""Colour transforms of LDR-ꟻLIP, batched over [N, C, H, W] tensors (channel dim 1).

sRGB -> linear RGB -> CIE XYZ (D65) -> YCxCz (opponent space) and back, and linear RGB
-> Hunt-adjusted CIELab, as in Andersson et al. 2020, "FLIP: A Difference Evaluator for
Alternating Images", Sec. 3, with the constants of NVIDIA's reference implementation.
The linear steps are folded into single affine maps (one pass over the pixels each).
"""

from __future__ import annotations

import torch

RGB_TO_XYZ = torch.tensor([
    [10135552 / 24577794, 8788810 / 24577794, 4435075 / 24577794],
    [2613072 / 12288897, 8788810 / 12288897, 887015 / 12288897],
    [1425312 / 73733382, 8788810 / 73733382, 70074185 / 73733382],
], dtype=torch.float64)
XYZ_TO_RGB = torch.tensor([
    [3.241003275, -1.537398934, -0.498615861],
    [-0.969224334, 1.875930071, 0.041554224],
    [0.055639423, -0.204011202, 1.057148933],
], dtype=torch.float64)
D65 = torch.tensor([0.950428545, 1.0, 1.088900371], dtype=torch.float64)
INV_D65 = torch.tensor([1.052156925, 1.0, 0.918357670], dtype=torch.float64)
# Illuminant-normalised XYZ (x, y, z) -> (Y, Cx, Cz) = (116 y - 16, 500 (x - y), 200 (y - z)).
_OPP = torch.tensor([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]], dtype=torch.float64)
_OPP_OFFSET = torch.tensor([-16.0, 0.0, 0.0], dtype=torch.float64)
RGB_TO_YCXCZ = _OPP @ torch.diag(INV_D65) @ RGB_TO_XYZ
YCXCZ_TO_RGB = XYZ_TO_RGB @ torch.diag(D65) @ torch.linalg.inv(_OPP)
RGB_TO_XYZN = torch.diag(INV_D65) @ RGB_TO_XYZ
_DELTA = 6.0 / 29.0


def affine(x: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """matrix [C', C] @ x [N, C, H, W] (+ offset [C']) over the channel dim -> [N, C', H, W]."""
    out = torch.einsum("ij,njhw->nihw", matrix.to(x), x)
    return out if offset is None else out + offset.to(x).view(1, -1, 1, 1)


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> linear RGB in [0, 1] (IEC 61966-2-1)."""
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_ycxcz(rgb: torch.Tensor) -> torch.Tensor:
    """Linear RGB -> YCxCz (Y in [-16, 100]); FLIP Sec. 3.1."""
    return affine(rgb, RGB_TO_YCXCZ, _OPP_OFFSET)


def ycxcz_to_linear(ycxcz: torch.Tensor) -> torch.Tensor:
    """YCxCz -> linear RGB (unclamped)."""
    return affine(ycxcz, YCXCZ_TO_RGB, -(YCXCZ_TO_RGB @ _OPP_OFFSET))


def linear_to_hunt_lab(rgb: torch.Tensor) -> torch.Tensor:
    """Linear RGB -> CIELab with the Hunt adjustment a, b *= 0.01 L (FLIP Sec. 3.2)."""
    t = affine(rgb, RGB_TO_XYZN)
    f = torch.where(t > _DELTA**3, t.clamp(min=0) ** (1 / 3), t / (3 * _DELTA**2) + 4 / 29)
    lab = affine(f, _OPP, _OPP_OFFSET)  # the same linear map as YCxCz, on f(t) instead of t
    return torch.cat((lab[:, :1], lab[:, 1:] * (0.01 * lab[:, :1])), 1)


def hyab(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """HyAB distance |dL| + ||d(a, b)||_2 over channel dim -3 (FLIP eq. 4): [..., 3, H, W] -> [..., H, W]."""
    d = a - b
    return d[..., 0, :, :].abs() + torch.hypot(d[..., 1, :, :], d[..., 2, :, :])


def max_hunt_hyab() -> float:
    """HyAB distance between Hunt-adjusted pure green and pure blue: the largest colour error."""
    lab = linear_to_hunt_lab(torch.eye(3, dtype=torch.float64)[1:].view(2, 3, 1, 1))
    return float(hyab(lab[0], lab[1]))
