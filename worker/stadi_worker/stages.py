"""The denoiser cut in two pipeline stages (strategy ``hybrid``'s window).

The unit table comes from ``stadi.planner.stage_split`` (built from this model's own config, so it names
this model's modules in call order); stage 0 runs units [0, b) and returns its hand-over, stage 1 runs the
rest on a hand-over and returns the noise prediction. Both are pure functions of tensors with fixed shapes
per step (no Python state crosses them), so that they can be captured as CUDA graphs. Each stage computes
the time and text embeddings it needs itself: they are cheap, and the hand-over stays activations only.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from stadi.planner.stage_split import DiTArch, UNetArch, Unit, dit_units, unet_units
from stadi_worker.pipelines import FLOW_FAMILIES, FamilyOps

_UNET_PART = re.compile(
    r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|attentions|downsamplers|upsamplers)\.\d+$")


def unit_table(ops: FamilyOps, latent_h: int, latent_w: int) -> list[Unit]:
    """The units of this pipeline's denoiser, with their analytic cost at this latent size."""
    config = ops.denoiser.config
    if ops.family in FLOW_FAMILIES:
        return dit_units(DiTArch.from_config(config), latent_h, latent_w)
    if ops.family != "sdxl":
        raise ValueError(f"strategy hybrid has no stage split for family {ops.family!r}")
    return unet_units(UNetArch.from_config(config), latent_h, latent_w)


class Stages:
    """A denoiser cut before unit ``boundary``; ``cond`` is the batched conditioning of ``FamilyOps``."""

    def __init__(self, ops: FamilyOps, latent_h: int, latent_w: int, boundary: int):
        self.units = unit_table(ops, latent_h, latent_w)
        if not 0 < boundary < len(self.units):
            raise ValueError(f"stage boundary {boundary} is outside 1..{len(self.units) - 1}")
        self.boundary = boundary
        self.latent_hw = (latent_h, latent_w)
        self.net: Any = ops.denoiser
        self.dit = ops.family in FLOW_FAMILIES
        self.modules = [self.net.get_submodule(u.name) for u in self.units]
        if not self.dit:
            _check_unet(self.net, self.units)

    def first(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Stage 0 on the scaled latent ``x``: the hand-over (DiT: image and text tokens; UNet: the hidden
        state, then the skips still to be consumed, oldest first)."""
        if self.dit:
            tr = self.net
            temb = tr.time_text_embed(t.expand(x.shape[0]), cond["pooled_projections"])
            h = tr.pos_embed(x).contiguous()
            ctx = tr.context_embedder(cond["encoder_hidden_states"])
            return self._blocks(0, self.boundary, h, ctx, temb)
        emb, text = self._unet_embeddings(x, t, cond)
        h, skips = self._unet_units(0, self.boundary, x, [], emb, text)
        return (h, *skips)

    def second(self, carry: tuple[torch.Tensor, ...], t: torch.Tensor, cond: dict[str, torch.Tensor]
               ) -> torch.Tensor:
        """Stage 1 on a hand-over of stage 0: the noise prediction of every batch item."""
        n = len(self.units)
        if self.dit:
            tr = self.net
            temb = tr.time_text_embed(t.expand(carry[0].shape[0]), cond["pooled_projections"])
            h, _ = self._blocks(self.boundary, n, carry[0], carry[1], temb)
            return self._unpatchify(tr.proj_out(tr.norm_out(h, temb)))
        emb, text = self._unet_embeddings(carry[0], t, cond)
        h, _ = self._unet_units(self.boundary, n, carry[0], list(carry[1:]), emb, text)
        return h

    def _blocks(self, lo: int, hi: int, h: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.modules[lo:hi]:
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb, joint_attention_kwargs=None)
        return h, ctx

    def _unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        p, c = self.net.config.patch_size, self.net.out_channels
        rows, cols = self.latent_hw[0] // p, self.latent_hw[1] // p
        h = h.reshape(h.shape[0], rows, cols, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], c, rows * p, cols * p)

    def _unet_embeddings(self, sample: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The time embedding (with SDXL's text_time addition) and the text context, as the UNet's forward
        computes them; ``sample`` gives only batch size, device and dtype."""
        unet = self.net
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
        text = cond["encoder_hidden_states"]
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added)
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb, unet.process_encoder_hidden_states(encoder_hidden_states=text, added_cond_kwargs=added)

    def _unet_units(self, lo: int, hi: int, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
                    text: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Units [lo, hi) in the order of UNet2DConditionModel.forward and its blocks' forwards."""
        for unit, module in zip(self.units[lo:hi], self.modules[lo:hi], strict=True):
            if unit.pop:
                h = torch.cat([h, skips.pop()], dim=1)
            if unit.kind == "resnet":
                h = module(h, emb)
            elif unit.kind == "attn":
                h = module(h, encoder_hidden_states=text, return_dict=False)[0]
            elif unit.kind == "conv_out" and self.net.conv_norm_out is not None:
                h = module(self.net.conv_act(self.net.conv_norm_out(h)))
            else:  # conv_in, conv_out without norm, down- and upsamplers
                h = module(h)
            if unit.push:
                skips.append(h)
        return h, skips


def _check_unet(unet: Any, units: list[Unit]) -> None:
    """Refuse a UNet whose forward does more than the units replay (class labels, image hints, FreeU, an
    encoder projection, a block the table does not list)."""
    config = unet.config
    if unet.class_embedding is not None or unet.encoder_hid_proj is not None or config.center_input_sample \
            or config.addition_embed_type not in (None, "text_time"):
        raise ValueError("this UNet's forward has inputs the hybrid stage split does not replay")
    if any(getattr(block, "s1", None) for block in unet.up_blocks):
        raise ValueError("FreeU is enabled: the hybrid stage split does not replay it")
    parts = {name for name, _ in unet.named_modules() if _UNET_PART.match(name)}
    listed = {u.name for u in units if _UNET_PART.match(u.name)}
    if parts != listed:
        raise ValueError(f"the UNet's blocks differ from the stage table: {sorted(parts ^ listed)}")
