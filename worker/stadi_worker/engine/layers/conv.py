"""Conv2d over a band: halo rows from the neighbouring bands, zero padding only at the image edges."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stadi_worker.engine.comm import CommManager


def needs_halo(conv: nn.Conv2d) -> bool:
    """Whether an output row of ``conv`` reads input rows outside its own stride cell."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return p != 0 or k != s


class PatchConv2d(nn.Module):
    """Runs ``conv`` on our band extended by ``padding`` rows from the band above and ``k - s - p`` from
    the band below (exactly the rows the full-image convolution would read); stride-2 downsamplers need
    only the row above."""

    def __init__(self, conv: nn.Conv2d, comm: CommManager):
        super().__init__()
        if conv.dilation[0] != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError(f"band convolution needs dilation 1 and numeric zero padding: {conv}")
        self.conv = conv
        self.comm = comm
        self.key = comm.new_key()
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        self.top = p
        self.bottom = k - s - p  # may be negative: then our last rows are not read at all
        # the group's geometry as plain ints: dynamo guards on what a compiled frame reads, and reading the layout's
        # bands would tie the compile to their heights (a new plan, a new band height: every wrapper compiled again)
        self.size, self.above, self.below = comm.size, comm.layout.above, comm.layout.below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return self.conv(x)
        top, bottom = self.top, max(self.bottom, 0)
        h = x.shape[-2]
        if h < max(top, bottom) or h % self.conv.stride[0]:
            raise ValueError(f"band of {h} rows too small or misaligned for {self.conv}")
        # what our neighbours need from us: our first rows go up, our last rows go down
        send = torch.cat([x[..., :bottom, :], x[..., h - top:, :]], dim=-2)
        above, below = self.above, self.below

        def extend(parts: list[torch.Tensor]) -> torch.Tensor:
            pieces = []
            if top:
                edge = x.new_zeros(*x.shape[:-2], top, x.shape[-1])
                pieces.append(parts[above][..., bottom:, :] if above is not None else edge)
            pieces.append(x if self.bottom >= 0 else x[..., : h + self.bottom, :])
            if bottom:
                edge = x.new_zeros(*x.shape[:-2], bottom, x.shape[-1])
                pieces.append(parts[below][..., :bottom, :] if below is not None else edge)
            return torch.cat(pieces, dim=-2)

        ext = extend(self.comm.exchange(self.key, send, [top + bottom] * self.size, dim=-2))
        c = self.conv
        return F.conv2d(ext, c.weight, c.bias, c.stride, (0, c.padding[1]), c.dilation, c.groups)
