"""Stable Diffusion XL: a three-level UNet with two CLIP text encoders and size micro-conditions."""

from __future__ import annotations

from typing import Any

import torch

from stadi.api import DiffusionJobSpec
from stadi_worker.models import components as parts
from stadi_worker.models.base import Branches, Size
from stadi_worker.models.unet import UNetOps


class SDXLOps(UNetOps):
    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"

    @classmethod
    def build(cls, size: Size) -> Any:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        tokenizer = parts.clip_tokenizer()
        vocab = len(tokenizer)
        with parts.seeded():
            return StableDiffusionXLPipeline(
                vae=parts.vae(size, 4, 0.13025, None),
                text_encoder=parts.clip_text_encoder(size, vocab, "l", False), tokenizer=tokenizer,
                text_encoder_2=parts.clip_text_encoder(size, vocab, "g", True), tokenizer_2=tokenizer,
                unet=unet(size),
                scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **parts.SD_BETAS),
            )

    def encode(self, spec: DiffusionJobSpec, prompt: str, guidance: bool) -> Branches:
        pe, npe, ppe, nppe = self.pipe.encode_prompt(
            prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
            negative_prompt=spec.negative_prompt or None)
        # original size, crop top-left, target size: the pipeline's defaults for an uncropped image
        time_ids = torch.tensor([[spec.height, spec.width, 0, 0, spec.height, spec.width]],
                                device=self.device, dtype=pe.dtype).expand(pe.shape[0], -1)
        out = {"cond": {"encoder_hidden_states": pe, "text_embeds": ppe, "time_ids": time_ids}}
        if guidance:
            out["uncond"] = {"encoder_hidden_states": npe, "text_embeds": nppe, "time_ids": time_ids}
        return out

    def added_cond(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}


def unet(size: Size) -> Any:
    """SDXL's UNet; small and tiny keep its structure (3 levels, 2 downsamplings, cross-attention transformers in
    the two lower levels, the text_time embedding) at reduced width: small is the one trained from scratch."""
    from diffusers import UNet2DConditionModel

    common = dict(
        in_channels=4, out_channels=4, use_linear_projection=True, addition_embed_type="text_time",
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    if size == "tiny":
        return UNet2DConditionModel(
            sample_size=16, block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32, **common)
    if size == "small":  # 5.6 M parameters; text: the two small CLIP towers' 64 + 64 features, pooled 64
        return UNet2DConditionModel(
            sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8,
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=128,
            addition_time_embed_dim=16, projection_class_embeddings_input_dim=16 * 6 + 64, **common)
    return UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, norm_num_groups=32,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, **common)
