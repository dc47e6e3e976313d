"""Stable Diffusion 1.5: a four-level UNet with one CLIP text encoder, sampled with DDIM by default."""

from __future__ import annotations

from typing import Any

from stadi.api import DiffusionJobSpec
from stadi_worker.models import components as parts
from stadi_worker.models.base import Branches, Size
from stadi_worker.models.unet import UNetOps


class SD15Ops(UNetOps):
    family = "sd15"
    pipeline_class = "StableDiffusionPipeline"

    @classmethod
    def build(cls, size: Size) -> Any:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        tokenizer = parts.clip_tokenizer()
        with parts.seeded():
            return StableDiffusionPipeline(
                vae=parts.vae(size, 4, 0.18215, None),
                text_encoder=parts.clip_text_encoder(size, len(tokenizer), "l", False), tokenizer=tokenizer,
                unet=unet(size),
                scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **parts.SD_BETAS),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )

    def encode(self, spec: DiffusionJobSpec, prompt: str, guidance: bool) -> Branches:
        pe, npe = self.pipe.encode_prompt(prompt, self.device, 1, guidance,
                                          negative_prompt=spec.negative_prompt or None)
        out = {"cond": {"encoder_hidden_states": pe}}
        if guidance:
            out["uncond"] = {"encoder_hidden_states": npe}
        return out


def unet(size: Size) -> Any:
    """SD 1.5's UNet (3 downsamplings), or a toy one of the same block structure."""
    from diffusers import UNet2DConditionModel

    common = dict(
        in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    if size == "tiny":
        return UNet2DConditionModel(sample_size=16, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                                    norm_num_groups=8, attention_head_dim=2, cross_attention_dim=32, **common)
    return UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                norm_num_groups=32, attention_head_dim=8, cross_attention_dim=768, **common)
