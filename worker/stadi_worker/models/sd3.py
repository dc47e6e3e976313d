"""Stable Diffusion 3 (medium): an MMDiT of joint image-text blocks, flow matching, two CLIP text encoders.

Saved and loaded without its T5 encoder (``text_encoder_3=None``: the pipeline feeds zeros in its place), which
keeps the denoiser at its real cost and the random-weight pipeline small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stadi.api import DiffusionJobSpec
from stadi.planner.stage_split import DiTArch, Unit, dit_units
from stadi_worker.models import components as parts
from stadi_worker.models.base import Branches, ModelOps, Size, check_stage_boundary


class SD3Ops(ModelOps):
    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_attr = "transformer"
    flow_matching = True

    @classmethod
    def build(cls, size: Size) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        tokenizer = parts.clip_tokenizer()
        vocab = len(tokenizer)
        with parts.seeded():
            return StableDiffusion3Pipeline(
                vae=parts.vae(size, 16, 1.5305, 0.0609),
                text_encoder=parts.clip_text_encoder(size, vocab, "l", True), tokenizer=tokenizer,
                text_encoder_2=parts.clip_text_encoder(size, vocab, "g", True), tokenizer_2=tokenizer,
                text_encoder_3=None, tokenizer_3=None,
                transformer=transformer(size),
                scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            )

    @classmethod
    def load_kwargs(cls, path: Path) -> dict[str, Any]:
        if (path / "text_encoder_3").exists():
            return {}
        return {"text_encoder_3": None, "tokenizer_3": None}

    def encode(self, spec: DiffusionJobSpec, prompt: str, guidance: bool) -> Branches:
        pe, npe, ppe, nppe = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=guidance, negative_prompt=spec.negative_prompt or None)
        out = {"cond": {"encoder_hidden_states": pe, "pooled_projections": ppe}}
        if guidance:
            out["uncond"] = {"encoder_hidden_states": npe, "pooled_projections": nppe}
        return out

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 denoiser: Any = None) -> torch.Tensor:
        net = denoiser if denoiser is not None else self.denoiser
        return net(hidden_states=latents, timestep=t.expand(latents.shape[0]),
                   encoder_hidden_states=cond["encoder_hidden_states"],
                   pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    def units(self, latent_h: int, latent_w: int) -> list[Unit]:
        return dit_units(DiTArch.from_config(self.denoiser.config), latent_h, latent_w)

    def stages(self, latent_h: int, latent_w: int, boundary: int) -> SD3Stages:
        return SD3Stages(self.denoiser, self.units(latent_h, latent_w), boundary, (latent_h, latent_w))


class SD3Stages:
    """The MMDiT cut between joint blocks; the hand-over is the image and the text tokens. Each stage computes
    the time embedding it needs itself: it is cheap, and the hand-over stays activations only."""

    def __init__(self, transformer: Any, units: list[Unit], boundary: int, latent_hw: tuple[int, int]):
        check_stage_boundary(units, boundary)
        self.units, self.boundary, self.net, self.latent_hw = units, boundary, transformer, latent_hw
        self.modules = [transformer.get_submodule(u.name) for u in units]

    def first(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        tr = self.net
        temb = tr.time_text_embed(t.expand(x.shape[0]), cond["pooled_projections"])
        h = tr.pos_embed(x).contiguous()
        ctx = tr.context_embedder(cond["encoder_hidden_states"])
        return self._blocks(0, self.boundary, h, ctx, temb)

    def second(self, carry: tuple[torch.Tensor, ...], t: torch.Tensor, cond: dict[str, torch.Tensor]
               ) -> torch.Tensor:
        tr = self.net
        temb = tr.time_text_embed(t.expand(carry[0].shape[0]), cond["pooled_projections"])
        h, _ = self._blocks(self.boundary, len(self.units), carry[0], carry[1], temb)
        return self._unpatchify(tr.proj_out(tr.norm_out(h, temb)))

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


def transformer(size: Size) -> Any:
    """SD3-medium's MMDiT (24 joint blocks of width 1536), a small one of 4 blocks of width 128 (trained from
    scratch), or a toy one of 2 blocks."""
    from diffusers import SD3Transformer2DModel

    if size == "tiny":
        return SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32)
    if size == "small":  # 2.3 M parameters; text: the two small CLIP towers' 64 + 64 features, pooled 64 + 64
        return SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128,
            pos_embed_max_size=64)
    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, pos_embed_max_size=192)
