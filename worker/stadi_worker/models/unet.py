"""What the UNet families (SDXL, SD 1.5) share: the denoiser call and the UNet's stage split.

The stage split replays ``UNet2DConditionModel.forward`` unit by unit from the unit table of
``stadi.planner.stage_split`` (built from this model's own config, so it names this model's modules in call
order): stage 0 runs units [0, b) and returns the hidden state and the skips still to be consumed, stage 1 runs
the rest. Each stage computes the time and text embeddings it needs itself: they are cheap, and the hand-over
stays activations only.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from stadi.planner.stage_split import UNetArch, Unit, unet_units
from stadi_worker.models.base import ModelOps, check_stage_boundary

_UNET_PART = re.compile(
    r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|attentions|downsamplers|upsamplers)\.\d+$")


class UNetOps(ModelOps):
    """A diffusers ``UNet2DConditionModel`` denoiser; subclasses add their text encoding."""

    def added_cond(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` (SDXL's pooled text and size ids), None when it takes none."""
        return None

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 denoiser: Any = None) -> torch.Tensor:
        net = denoiser if denoiser is not None else self.denoiser
        return net(latents, t, encoder_hidden_states=cond["encoder_hidden_states"],
                   added_cond_kwargs=self.added_cond(cond), return_dict=False)[0]

    def units(self, latent_h: int, latent_w: int) -> list[Unit]:
        return unet_units(UNetArch.from_config(self.denoiser.config), latent_h, latent_w)

    def stages(self, latent_h: int, latent_w: int, boundary: int) -> UNetStages:
        return UNetStages(self.denoiser, self.units(latent_h, latent_w), boundary)


class UNetStages:
    """A UNet cut before unit ``boundary``; ``cond`` is the batched conditioning of ``ModelOps.encode``."""

    def __init__(self, unet: Any, units: list[Unit], boundary: int):
        check_stage_boundary(units, boundary)
        check_unet(unet, units)
        self.units, self.boundary, self.net = units, boundary, unet
        self.modules = [unet.get_submodule(u.name) for u in units]

    def first(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Stage 0 on the scaled latent ``x``: the hidden state, then the skips still to be consumed, oldest
        first."""
        emb, text = self._embeddings(x, t, cond)
        h, skips = self._units(0, self.boundary, x, [], emb, text)
        return (h, *skips)

    def second(self, carry: tuple[torch.Tensor, ...], t: torch.Tensor, cond: dict[str, torch.Tensor]
               ) -> torch.Tensor:
        emb, text = self._embeddings(carry[0], t, cond)
        h, _ = self._units(self.boundary, len(self.units), carry[0], list(carry[1:]), emb, text)
        return h

    def _embeddings(self, sample: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
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

    def _units(self, lo: int, hi: int, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
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


def check_unet(unet: Any, units: list[Unit]) -> None:
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
