"""One image on one process, no communication: the reference every parallel run is compared with, and the
``single`` strategy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stadi.api import DiffusionJobSpec
from stadi_worker.engine.bands import Workspace, guide
from stadi_worker.engine.result import GenerationResult
from stadi_worker.engine.sampling import StepTimer, denoise_loop, initial_noise, job_sampler
from stadi_worker.models import ops_for
from stadi_worker.models.base import batch_branches


def generate_serial(pipe: Any, spec: DiffusionJobSpec, prompt: str, seed: int, *,
                    on_step: Callable[[int, int], None] | None = None, decode: bool = True,
                    workspace: Workspace | None = None) -> GenerationResult:
    """Every step of ``prompt``'s image on this process (whole-frame steps, compiled when the job asks)."""
    ops = ops_for(pipe, spec.model.family)
    workspace = workspace or Workspace()
    graphs = workspace.graphs_for(ops.device)
    whole = workspace.step_denoiser(ops, spec)
    guidance = spec.uses_cfg
    order = ["uncond", "cond"] if guidance else ["cond"]
    with torch.no_grad():
        cond = batch_branches(ops.encode(spec, prompt, guidance), order)
    keys, values = list(cond), list(cond.values())
    sampler = job_sampler(ops, spec)
    latents = initial_noise(ops.latent_shape(spec), seed, sampler.init_noise_sigma).to(ops.device, ops.dtype)
    timer = StepTimer(ops.device)

    def forward(x: torch.Tensor, t: torch.Tensor, *c: torch.Tensor) -> torch.Tensor:
        out = ops(torch.cat([x] * len(order)), t, dict(zip(keys, c, strict=True)), denoiser=whole)
        return guide(*out.chunk(2), spec.guidance_scale) if guidance else out

    def eps_fn(x: torch.Tensor, t: torch.Tensor, index: int) -> torch.Tensor:
        return graphs.run(("serial", id(ops.denoiser), spec.guidance_scale, guidance), forward, x, t, *values)

    latents = denoise_loop(sampler, latents, eps_fn, timer, on_step)
    return GenerationResult(image=ops.decode(latents) if decode else None, latents=latents,
                            step_ms=timer.ms(), evals=list(sampler.grid),
                            wait_ms=[0.0] * len(sampler.grid))
