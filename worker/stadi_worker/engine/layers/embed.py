"""Patch embedding of a band (SD3, PixArt): positional embedding of the band's rows of the full grid."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed
from torch import nn

from stadi_worker.engine.comm import BandLayout


class PatchBandEmbed(nn.Module):
    """The projection (kernel = stride = patch) is local; the positional embedding must be that of the full
    image cropped to our token rows, not the embedding of a small image of band height."""

    def __init__(self, embed: PatchEmbed, layout: BandLayout):
        super().__init__()
        self.embed = embed
        self.layout = layout

    # Not traced: the crop of the positional embedding starts at our band's first row, a Python int that a
    # compiled step would guard on, recompiling for every band a re-plan cuts; eager, it costs nothing inside
    # the step's CUDA graph.
    @torch.compiler.disable
    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        e = self.embed
        p = e.patch_size
        start, end = self.layout.mine
        if start % p or end % p:
            raise ValueError(f"band {start}:{end} is not a multiple of the patch size {p}")
        full_h, width = self.layout.height, latent.shape[-1]
        x = e.proj(latent)
        if e.flatten:
            x = x.flatten(2).transpose(1, 2)
        if e.layer_norm:
            x = e.norm(x)
        if e.pos_embed is None:
            return x
        if e.pos_embed_max_size:
            pos = e.cropped_pos_embed(full_h, width)
        elif e.height != full_h // p or e.width != width // p:
            pos = get_2d_sincos_pos_embed(embed_dim=e.pos_embed.shape[-1], grid_size=(full_h // p, width // p),
                                          base_size=e.base_size, interpolation_scale=e.interpolation_scale,
                                          device=x.device, output_type="pt").float().unsqueeze(0)
        else:
            pos = e.pos_embed
        pos = pos.reshape(1, full_h // p, width // p, -1)[:, start // p: end // p].reshape(1, -1, pos.shape[-1])
        return (x + pos).to(x.dtype)
