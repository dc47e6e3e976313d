"""The public entry of the data plane: generate one image under a plan on the ranks of a process group."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from stadi.api import DiffusionJobSpec, Plan
from stadi_worker.comm import BandLayout, CommManager, all_gather_uneven
from stadi_worker.layers import patch_denoiser
from stadi_worker.pipelines import FamilyOps, batch_branches, make_scheduler
from stadi_worker.runtime import DistContext, check_plan
from stadi_worker.sampling import BandSampler, StepTimer, denoise_loop

if TYPE_CHECKING:
    import PIL.Image


@dataclass
class GenerationResult:
    image: PIL.Image.Image | None  # decoded on rank 0, None on other ranks
    latents: torch.Tensor | None  # final full latent on rank 0 (for fidelity tests)
    step_ms: list[float]  # this rank's per-step denoiser times


def initial_noise(shape: tuple[int, int, int], seed: int, sigma: float) -> torch.Tensor:
    """The full initial latent (1, C, H, W), fp32, drawn on the CPU: identical on every rank and device."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=g, dtype=torch.float32) * sigma


def _guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def generate_serial(pipe: Any, spec: DiffusionJobSpec, prompt: str, seed: int, *,
                    on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
    """One process, the same loop, no communication: the reference of every parallel run."""
    ops = FamilyOps(pipe, spec.model.family)
    guidance = spec.uses_cfg
    order = ["uncond", "cond"] if guidance else ["cond"]
    cond = batch_branches(ops.encode(spec, prompt, guidance), order)
    sampler = BandSampler(make_scheduler(pipe, spec.model.family, spec.scheduler), spec.steps, ops.device)
    latents = initial_noise(ops.latent_shape(spec), seed, sampler.init_noise_sigma).to(ops.device, ops.dtype)
    timer = StepTimer(ops.device)

    def eps_fn(x: torch.Tensor, t: torch.Tensor, index: int) -> torch.Tensor:
        out = ops(torch.cat([x] * len(order)), t, cond)
        return _guide(*out.chunk(2), spec.guidance_scale) if guidance else out

    latents = denoise_loop(sampler, latents, eps_fn, timer, on_step)
    return GenerationResult(image=ops.decode(latents), latents=latents, step_ms=timer.ms())


def _groups(plan: Plan, rank: int) -> tuple[list[int], Any]:
    """The ranks that split the height with us, and their process group (None: the world).

    With a condition split every rank must create both subgroups, in the same order (new_group is
    collective over the world)."""
    if plan.ranks[rank].branch == "both":
        return [r.rank for r in plan.ranks], None
    members = {b: [r.rank for r in plan.ranks if r.branch == b] for b in ("cond", "uncond")}
    groups = {b: dist.new_group(members[b]) for b in ("cond", "uncond")}
    mine = plan.ranks[rank].branch
    return members[mine], groups[mine]


def _assemble(parts: list[torch.Tensor], plan: Plan, ranks: list[int]) -> torch.Tensor:
    """Full-height tensor from the bands of ``ranks`` (world-ordered ``parts``), top to bottom."""
    ranks = sorted(ranks, key=lambda r: plan.ranks[r].rows[0])
    return torch.cat([parts[r] for r in ranks], dim=-2)


def generate(pipe: Any, spec: DiffusionJobSpec, plan: Plan, ctx: DistContext, prompt: str, seed: int, *,
             exact: bool = False, on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Generate one image of ``prompt`` under ``plan``; call on every rank of the group.

    Each rank denoises its band of latent rows; the first ``plan.warmup_steps`` steps (all of them with
    ``exact``) exchange fresh activations at every layer, later steps use the other bands' activations from
    the previous step while the exchange overlaps compute. The final latent is gathered and decoded on rank 0.
    """
    check_plan(plan, spec, ctx)
    if ctx.world_size == 1:
        return generate_serial(pipe, spec, prompt, seed, on_step=on_step)
    family = spec.model.family
    ops = FamilyOps(pipe, family)
    guidance = spec.uses_cfg
    me = plan.ranks[ctx.rank]
    split = me.branch != "both"
    members, group = _groups(plan, ctx.rank)
    layout = BandLayout(bands=tuple(plan.ranks[r].rows for r in members), index=members.index(ctx.rank),
                        height=plan.latent_height)
    comm = CommManager(layout=layout, group=group, backend=ctx.backend)
    order = [me.branch] if split else (["uncond", "cond"] if guidance else ["cond"])
    cond = batch_branches(ops.encode(spec, prompt, guidance), order)
    sampler = BandSampler(make_scheduler(pipe, family, spec.scheduler), spec.steps, ops.device)
    start, end = me.rows
    full = initial_noise(ops.latent_shape(spec), seed, sampler.init_noise_sigma)
    latents = full[..., start:end, :].to(ops.device, ops.dtype)
    world_rows = [r.height for r in plan.ranks]
    timer = StepTimer(ops.device)

    def eps_fn(x: torch.Tensor, t: torch.Tensor, index: int) -> torch.Tensor:
        comm.begin_step(sync=exact or index < plan.warmup_steps)
        out = ops(torch.cat([x] * len(order)), t, cond)
        if not split:
            return _guide(*out.chunk(2), spec.guidance_scale) if guidance else out
        # condition split: every rank needs the other branch's prediction for its rows; predictions are
        # small (latent channels only), so all ranks gather both full frames and cut out their band
        _, recv, trim = all_gather_uneven(out, world_rows, dim=-2, backend=ctx.backend)
        parts = trim(recv)
        branch = {b: _assemble(parts, plan, [r.rank for r in plan.ranks if r.branch == b])
                  for b in ("uncond", "cond")}
        return _guide(branch["uncond"], branch["cond"], spec.guidance_scale)[..., start:end, :]

    restore = patch_denoiser(ops.denoiser, comm)
    try:
        latents = denoise_loop(sampler, latents, eps_fn, timer, on_step)
        comm.drain()
    finally:
        restore()
    step_ms = timer.ms()
    # final latent: gathered by band height; rank 0 assembles its own group's bands
    _, recv, trim = all_gather_uneven(latents, world_rows, dim=-2, backend=ctx.backend)
    parts = trim(recv)
    if ctx.rank != 0:
        return GenerationResult(image=None, latents=None, step_ms=step_ms)
    final = _assemble(parts, plan, members)
    return GenerationResult(image=ops.decode(final), latents=final, step_ms=step_ms)
