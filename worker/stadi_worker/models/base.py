"""The one protocol between the engine and a model family: ``ModelOps``, bound to a loaded diffusers pipeline.

The sampling loop never calls ``pipe.__call__``: it runs the denoiser on a band of rows and the scheduler on
that band, so it asks the family for the pieces. A family module (``sdxl.py``, ``sd3.py``, ...) subclasses
``ModelOps`` with its pipeline class, how a prompt becomes the denoiser's keyword inputs, how the denoiser is
called, how a random-weight pipeline of its architecture is built offline and, where strategy ``hybrid``
applies, how its denoiser is cut into two pipeline stages. Nothing outside the family modules branches on a
family's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch

from stadi.api import DiffusionJobSpec
from stadi.planner.stage_split import Unit

# Architectures built offline: tiny for tests, small (trainable in minutes: the built-in trained checkpoints) and full
# (the real shapes, random weights: their cost is the real cost) for speed.
Size = Literal["tiny", "small", "full"]
Branches = dict[str, dict[str, torch.Tensor]]  # per guidance branch ("cond", "uncond"): the denoiser's inputs


class StageSplit(Protocol):
    """A denoiser cut before unit ``boundary`` of ``units`` (strategy hybrid's pipeline window); both stages are
    pure functions of tensors, so they can be captured as CUDA graphs."""

    units: list[Unit]
    boundary: int

    def first(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Stage 0 on the scaled latent: the hand-over to stage 1."""
        ...

    def second(self, carry: tuple[torch.Tensor, ...], t: torch.Tensor, cond: dict[str, torch.Tensor]
               ) -> torch.Tensor:
        """Stage 1 on a hand-over: the noise prediction of every batch item."""
        ...


class ModelOps:
    """What the engine needs from one family's pipeline; subclass per family."""

    family: ClassVar[str]
    pipeline_class: ClassVar[str]  # the diffusers class ``from_pretrained`` must produce
    denoiser_attr: ClassVar[str] = "unet"  # where the pipeline keeps its denoiser ("transformer" for DiTs)
    flow_matching: ClassVar[bool] = False  # trained with flow matching: samples with FlowMatch-Euler only

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    # --- building and loading ---

    @classmethod
    def build(cls, size: Size) -> Any:
        """A pipeline of this family with random weights from a fixed seed, built without the network."""
        raise NotImplementedError

    @classmethod
    def load_kwargs(cls, path: Path) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments for the pipeline saved at ``path``."""
        return {}

    # --- the denoiser ---

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def latent_shape(self, spec: DiffusionJobSpec) -> tuple[int, int, int]:
        """(channels, latent rows, latent columns) of one image of ``spec``."""
        factor = self.pipe.vae_scale_factor
        return self.denoiser.config.in_channels, spec.height // factor, spec.width // factor

    def timestep_kwargs(self, spec: DiffusionJobSpec) -> dict[str, Any]:
        """Extra arguments of the scheduler's ``set_timesteps`` for ``spec`` (a resolution-dependent shift), as the
        family's own pipeline passes them."""
        return {}

    def encode(self, spec: DiffusionJobSpec, prompt: str | list[str], guidance: bool) -> Branches:
        """Per branch ("cond", and "uncond" when guidance) the denoiser's keyword inputs, one batch item per
        prompt, as the family's own pipeline builds them ("uncond" is what the pipeline guides against). The caller
        chooses the grad mode: the engine encodes without, training through the text encoders."""
        raise NotImplementedError

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 denoiser: Any = None) -> torch.Tensor:
        """One denoiser evaluation on ``latents`` (a band or the full frame) with batched conditioning;
        ``denoiser`` replaces the pipeline's own (a compiled version of it)."""
        raise NotImplementedError

    # --- strategy hybrid ---

    def units(self, latent_h: int, latent_w: int) -> list[Unit]:
        """The denoiser's units in call order, with their analytic cost at this latent size."""
        raise ValueError(f"strategy hybrid has no stage split for family {self.family!r}")

    def stages(self, latent_h: int, latent_w: int, boundary: int) -> StageSplit:
        """The denoiser cut before unit ``boundary``."""
        raise ValueError(f"strategy hybrid has no stage split for family {self.family!r}")

    # --- decoding ---

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        with torch.no_grad():
            x = latents.to(vae.dtype) / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None) is not None:
                x = x + vae.config.shift_factor
            return vae.decode(x, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> Any:
        """Full latent (batch 1) -> PIL image."""
        return self.pipe.image_processor.postprocess(self._vae_decode(latents), output_type="pil")[0]

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Full latent (batch 1) -> float image (1, 3, H, W) in [0, 1] (fidelity metrics, no 8-bit rounding)."""
        return (self._vae_decode(latents).float() / 2 + 0.5).clamp(0, 1).cpu()


def check_stage_boundary(units: list[Unit], boundary: int) -> None:
    """ValueError unless ``boundary`` leaves both stages at least one unit."""
    if not 0 < boundary < len(units):
        raise ValueError(f"stage boundary {boundary} is outside 1..{len(units) - 1}")


def batch_branches(branches: Branches, order: list[str]) -> dict[str, torch.Tensor]:
    """Concatenate the per-branch inputs of ``order`` along the batch (diffusers order: uncond, cond)."""
    keys = branches[order[0]].keys()
    return {k: torch.cat([branches[b][k] for b in order]) for k in keys}
