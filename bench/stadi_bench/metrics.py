"""Fidelity metrics of decoded images (floats in [0, 1], no 8-bit rounding) against a reference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (inf when identical)."""
    mse = float((x.float() - ref.float()).square().mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, ref: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of images (B, C, H, W) in [0, 1]: gaussian window 11, sigma 1.5, per
    channel, valid region, C1 = 0.01^2, C2 = 0.03^2."""
    x, y = x.double(), ref.double()
    c = x.shape[1]
    g = _gauss(size, sigma)
    win = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())
