"""PixArt-alpha: a DiT with cross-attention to T5 states, adaptive norms from the timestep alone, and (at 1024
px) resolution and aspect-ratio micro-conditions; it predicts a learned variance beside the noise."""

from __future__ import annotations

from typing import Any

import torch

from stadi.api import DiffusionJobSpec
from stadi_worker.models import components as parts
from stadi_worker.models.base import Branches, ModelOps, Size

TOKENS = 120  # PixArt-alpha's T5 prompt length (training and diffusers' default)


class PixArtOps(ModelOps):
    family = "pixart"
    pipeline_class = "PixArtAlphaPipeline"
    denoiser_attr = "transformer"

    @classmethod
    def build(cls, size: Size) -> Any:
        from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

        t5 = parts.t5_tokenizer()
        with parts.seeded():
            encoder = parts.t5_encoder(size, len(t5))
            return PixArtAlphaPipeline(
                tokenizer=t5, text_encoder=encoder, vae=parts.vae(size, 4, 0.18215, None),
                transformer=transformer(size, encoder.config.d_model),
                # PixArt-alpha's own: DDPM's linear betas, 2nd-order DPM-Solver++
                scheduler=DPMSolverMultistepScheduler(
                    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                    algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon"),
            )

    def encode(self, spec: DiffusionJobSpec, prompt: str, guidance: bool) -> Branches:
        """T5 states with their padding masks (the cross-attention must not attend to pad tokens); the 1024
        model (``use_additional_conditions``) also takes the image size and aspect ratio."""
        dev = self.device
        pe, pm, npe, npm = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=guidance, negative_prompt=spec.negative_prompt or "",
            device=dev, clean_caption=False, max_sequence_length=TOKENS)
        micro: dict[str, torch.Tensor] = {}
        if self.denoiser.use_additional_conditions:
            micro = {"resolution": torch.tensor([[spec.height, spec.width]], device=dev, dtype=pe.dtype),
                     "aspect_ratio": torch.tensor([[spec.height / spec.width]], device=dev, dtype=pe.dtype)}
        out = {"cond": {"encoder_hidden_states": pe, "encoder_attention_mask": pm, **micro}}
        if guidance:
            out["uncond"] = {"encoder_hidden_states": npe, "encoder_attention_mask": npm, **micro}
        return out

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 denoiser: Any = None) -> torch.Tensor:
        net = denoiser if denoiser is not None else self.denoiser
        micro = {"resolution": cond.get("resolution"), "aspect_ratio": cond.get("aspect_ratio")}
        out = net(latents, encoder_hidden_states=cond["encoder_hidden_states"],
                  encoder_attention_mask=cond["encoder_attention_mask"], timestep=t.expand(latents.shape[0]),
                  added_cond_kwargs=micro, return_dict=False)[0]
        # learned sigma: the variance channels follow the noise prediction; the sampler uses the noise only
        return out[:, :self.denoiser.config.in_channels]


def transformer(size: Size, caption_channels: int) -> Any:
    """PixArt-alpha XL-2 1024 (sample_size 128: the size micro-conditions), or a toy one of 2 blocks."""
    from diffusers import PixArtTransformer2DModel

    if size == "tiny":
        # width 48: divisible by 3, as the size micro-conditions of a sample_size 128 variant need
        return PixArtTransformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=4,
            attention_head_dim=12, cross_attention_dim=48, caption_channels=caption_channels,
            norm_type="ada_norm_single")
    return PixArtTransformer2DModel(
        sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
        attention_head_dim=72, cross_attention_dim=1152, caption_channels=caption_channels,
        norm_type="ada_norm_single")
