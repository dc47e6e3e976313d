"""FLUX.1 (dev): a guidance-distilled rectified-flow transformer of double-stream (joint image-text) and
single-stream blocks over 2x2-packed latent tokens, with 2-D rotary positions, a CLIP (pooled) and a T5 text
encoder, and FlowMatch-Euler with a resolution-dependent shift.

The engine keeps latents unpacked, (B, 16, rows, columns), so bands are cut in latent rows as for the other
families; this module packs a band into tokens for the transformer and unpacks its prediction. A band is whole
rows of packed tokens (2 latent rows: the family's granularity), and its image tokens' rotary positions are
their true rows in the full image: under the band wrappers the transformer's ``pos_embed`` says where the band
starts (``engine.layers.flux.PatchFluxPosEmbed``). The guidance scale is an input of the one forward per step
(the distilled guidance embedding): there is no unconditional branch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stadi.api import DiffusionJobSpec
from stadi_worker.models import components as parts
from stadi_worker.models.base import Branches, ModelOps, Size

# T5 tokens per prompt, as FLUX.1-dev's pipeline pads them (schnell: 256)
MAX_SEQUENCE_LENGTH = 512


class FluxOps(ModelOps):
    family = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_attr = "transformer"
    flow_matching = True

    @classmethod
    def build(cls, size: Size) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        tokenizer = parts.clip_tokenizer()
        t5_tokenizer = parts.t5_tokenizer(MAX_SEQUENCE_LENGTH)
        with parts.seeded():
            return FluxPipeline(
                vae=parts.vae(size, 16, 0.3611, 0.1159),
                text_encoder=parts.clip_text_encoder(size, len(tokenizer), "l", False), tokenizer=tokenizer,
                text_encoder_2=parts.t5_encoder(size, len(t5_tokenizer)), tokenizer_2=t5_tokenizer,
                transformer=transformer(size),
                # FLUX.1-dev's: the shift grows with the image's token count (``timestep_kwargs``)
                scheduler=FlowMatchEulerDiscreteScheduler(
                    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
            )

    def latent_shape(self, spec: DiffusionJobSpec) -> tuple[int, int, int]:
        factor = self.pipe.vae_scale_factor
        return self.denoiser.config.in_channels // 4, spec.height // factor, spec.width // factor

    def timestep_kwargs(self, spec: DiffusionJobSpec) -> dict[str, Any]:
        """FluxPipeline's schedule: sigmas 1 .. 1/T, shifted by mu, linear in the image's packed token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.pipe.scheduler.config
        _, rows, cols = self.latent_shape(spec)
        mu = calculate_shift((rows // 2) * (cols // 2), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return {"sigmas": np.linspace(1.0, 1 / spec.steps, spec.steps), "mu": mu}

    def encode(self, spec: DiffusionJobSpec, prompt: str | list[str], guidance: bool) -> Branches:
        pe, pooled, _ = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.device,
                                                max_sequence_length=MAX_SEQUENCE_LENGTH)
        scale = torch.full((pe.shape[0],), spec.guidance_scale, device=self.device, dtype=torch.float32)
        return {"cond": {"encoder_hidden_states": pe, "pooled_projections": pooled, "guidance": scale}}

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 denoiser: Any = None) -> torch.Tensor:
        net = denoiser if denoiser is not None else self.denoiser
        b, _, rows, cols = latents.shape
        start = getattr(self.denoiser.pos_embed, "band_start", 0)  # latent rows; 0 outside the band wrappers
        text = cond["encoder_hidden_states"]
        out = net(hidden_states=pack(latents), timestep=t.expand(b).to(latents.dtype) / 1000,
                  guidance=cond["guidance"].expand(b), pooled_projections=cond["pooled_projections"],
                  encoder_hidden_states=text, txt_ids=text.new_zeros(text.shape[1], 3),
                  img_ids=image_ids(start // 2, rows // 2, cols // 2, latents.device, text.dtype),
                  return_dict=False)[0]
        return unpack(out, rows, cols)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches as tokens, row-major (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of ``pack`` for a latent of ``rows`` x ``cols``."""
    b, _, d = tokens.shape
    x = tokens.view(b, rows // 2, cols // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, rows, cols)


def image_ids(first_row: int, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids (0, row, column) of the packed tokens of rows [first_row, first_row + rows), row-major."""
    r = torch.arange(first_row, first_row + rows, device=device, dtype=dtype)
    k = torch.arange(cols, device=device, dtype=dtype)
    ids = torch.stack(torch.meshgrid(r, k, indexing="ij"), dim=-1).reshape(rows * cols, 2)
    return torch.cat([ids.new_zeros(rows * cols, 1), ids], dim=1)


def transformer(size: Size) -> Any:
    """FLUX.1-dev's transformer (19 double-stream and 38 single-stream blocks of width 3072, guidance embedding),
    a small one (2 + 4 blocks of width 128) or a toy one (1 + 1 blocks)."""
    from diffusers import FluxTransformer2DModel

    if size == "tiny":  # text: the toy T5's 32 features, the toy CLIP's pooled 32
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
    if size == "small":  # text: the small T5's 64 features, the small CLIP's pooled 64
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
            axes_dims_rope=(8, 12, 12))
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
