"""What one image's generation reports on each rank."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from stadi.api import Plan

if TYPE_CHECKING:
    import PIL.Image



@dataclass
class GenerationResult:
    image: PIL.Image.Image | None  # decoded on rank 0, None on other ranks
    latents: torch.Tensor | None  # final full latent on rank 0 (for fidelity tests)
    step_ms: list[float]  # this rank's per-step denoiser times
    plan: Plan | None = None  # the plan the image finished with (the re-planned one, if any)
    measured_speeds: list[float] | None = None  # per rank, from the warmup (when profiled)
    replanned: bool = False
    predicted_gain: float | None = None  # (old - new) / old predicted seconds at the measured speeds
    evals: list[int] = field(default_factory=list)  # base indices where this rank ran the denoiser
    exchanges: list[int] = field(default_factory=list)  # base indices where an exchange started
    wait_ms: list[float] = field(default_factory=list)  # per step: time blocked in collectives (of step_ms)
