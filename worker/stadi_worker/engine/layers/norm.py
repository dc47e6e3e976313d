"""GroupNorm over a band: per-group statistics of every band combined, weighted by pixel count."""

from __future__ import annotations

import torch
from torch import nn

from stadi_worker.engine.comm import CommManager


class PatchGroupNorm(nn.Module):
    """Each band sends (count, mean, M2) per sample and group; Chan's parallel formula combines them into
    the full-image mean and variance (stable in fp32, unlike sum/sum-of-squares). Unequal bands weigh by
    their count. In stale mode the other bands' statistics are those of the last window exchange (extrapolated in
    local steps), ours fresh."""

    def __init__(self, norm: nn.GroupNorm, comm: CommManager):
        super().__init__()
        self.norm = norm
        self.comm = comm
        self.key = comm.new_key()
        self.size = comm.size  # an int, not the layout: a compiled frame would guard on the bands' heights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return self.norm(x)
        n = self.norm
        b, c = x.shape[:2]
        xf = x.reshape(b, n.num_groups, -1).float()
        count = xf.shape[-1]
        mean = xf.mean(-1)
        m2 = (xf - mean[..., None]).square().sum(-1)
        stats = torch.stack([torch.full_like(mean, count), mean, m2], dim=-1)

        def pool(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            counts, means, m2s = torch.stack(parts).unbind(-1)
            total = counts.sum(0)
            gmean = (counts * means).sum(0) / total
            var = (m2s + counts * (means - gmean).square()).sum(0) / total
            # local steps read extrapolated statistics, whose M2 may dip below zero; exact ones never do
            return gmean, var.clamp_min(0)

        gmean, var = pool(self.comm.exchange(self.key, stats, [b] * self.size, dim=0))
        y = ((xf - gmean[..., None]) * torch.rsqrt(var + n.eps)[..., None]).reshape(x.shape).to(x.dtype)
        if n.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * n.weight.view(shape) + n.bias.view(shape)
        return y
