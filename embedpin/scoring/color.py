"""Colour transforms of LDR-ꟻLIP, batched over [N, 3, H, W] tensors (channel dim 1).

sRGB -> linear RGB -> CIE XYZ (D65) -> YCxCz (opponent space) and back, and linear RGB
-> Hunt-adjusted CIELab, as in Andersson et al. 2020, "FLIP: A Difference Evaluator for
Alternating Images", Sec. 3 (constants as in NVIDIA's reference implementation).
"""

from __future__ import annotations

import torch

# Linear sRGB -> XYZ (D65) and its inverse.
RGB_TO_XYZ = (
    (10135552 / 24577794, 8788810 / 24577794, 4435075 / 24577794),
    (2613072 / 12288897, 8788810 / 12288897, 887015 / 12288897),
    (1425312 / 73733382, 8788810 / 73733382, 70074185 / 73733382),
)
XYZ_TO_RGB = (
    (3.241003275, -1.537398934, -0.498615861),
    (-0.969224334, 1.875930071, 0.041554224),
    (0.055639423, -0.204011202, 1.057148933),
)
D65 = (0.950428545, 1.0, 1.088900371)
INV_D65 = (1.052156925, 1.0, 0.918357670)
_DELTA = 6.0 / 29.0


def _matmul(x: torch.Tensor, m) -> torch.Tensor:
    """Apply a 3x3 matrix to the channel dim of [N, 3, H, W]."""
    return torch.einsum("ij,njhw->nihw", x.new_tensor(m), x)


def _scale(x: torch.Tensor, s) -> torch.Tensor:
    return x * x.new_tensor(s).view(1, 3, 1, 1)


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> linear RGB in [0, 1] (IEC 61966-2-1)."""
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_ycxcz(rgb: torch.Tensor) -> torch.Tensor:
    """Linear RGB -> YCxCz (Y in [-16, 100]); FLIP eq. 1."""
    xyz = _scale(_matmul(rgb, RGB_TO_XYZ), INV_D65)
    x, y, z = xyz.unbind(1)
    return torch.stack((116 * y - 16, 500 * (x - y), 200 * (y - z)), 1)


def ycxcz_to_linear(ycxcz: torch.Tensor) -> torch.Tensor:
    """YCxCz -> linear RGB (unclamped)."""
    big_y, cx, cz = ycxcz.unbind(1)
    y = (big_y + 16) / 116
    xyz = torch.stack((y + cx / 500, y, y - cz / 200), 1)
    return _matmul(_scale(xyz, D65), XYZ_TO_RGB)


def linear_to_hunt_lab(rgb: torch.Tensor) -> torch.Tensor:
    """Linear RGB -> CIELab with the Hunt adjustment a, b *= 0.01 L (FLIP eq. 3)."""
    t = _scale(_matmul(rgb, RGB_TO_XYZ), INV_D65)
    f = torch.where(t > _DELTA**3, t.clamp(min=0) ** (1 / 3), t / (3 * _DELTA**2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    lum = 116 * fy - 16
    return torch.stack((lum, 0.01 * lum * 500 * (fx - fy), 0.01 * lum * 200 * (fy - fz)), 1)


def hyab(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """HyAB distance |dL| + ||d(a, b)||_2 over channel dim -3 (FLIP eq. 4): [..., 3, H, W] -> [..., H, W]."""
    d = a - b
    return d[..., 0, :, :].abs() + torch.sqrt(d[..., 1, :, :] ** 2 + d[..., 2, :, :] ** 2)


def max_hunt_hyab() -> float:
    """HyAB distance between Hunt-adjusted pure green and pure blue: the largest colour error."""
    rgb = torch.eye(3, dtype=torch.float64)[1:].view(2, 3, 1, 1)
    lab = linear_to_hunt_lab(rgb)
    return float(hyab(lab[0], lab[1]))
