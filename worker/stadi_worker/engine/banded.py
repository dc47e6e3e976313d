"""Strategies that split the latent into bands (``patch``, ``stadi``, and with the condition split ``cfg`` and
``stadi+cfg``): one image on the ranks of a process group.

Timeline of one image (docs/architecture.md, "Execution"): W synchronous warmup steps, timed per rank; the
re-plan (``replan.replan_together``; bands are re-cut once when the predicted gain passes
``replanThreshold``; a rank left out idles for the rest of the image and only joins the final gather); then
windows of P = ``plan.sync_period`` base steps in which rank r takes P/k_r steps on its own sub-grid. Each window
start reads the context of the previous one and starts one bucketed exchange of its fresh activations, which the
next window start (or a synchronous step, a re-plan, the image's end) waits for; local steps never wait
(``comm.CommManager``). When (T - W) is not a multiple of P, the first (T - W) mod P steps after warmup form a
short window in which every rank takes every step (stale, like patch parallelism), so the full windows that
follow all end on the final timestep.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from stadi.api import DiffusionJobSpec, Plan
from stadi_worker.engine.bands import Workspace
from stadi_worker.engine.replan import replan_together
from stadi_worker.engine.result import GenerationResult
from stadi_worker.engine.runtime import DistContext
from stadi_worker.engine.sampling import Pace, StepTimer, initial_noise, is_boundary, job_sampler, subgrid
from stadi_worker.models import ops_for

# The plans a re-plan of this engine may switch to mid-image: those it runs itself (single by leaving ranks idle).
# cfg-stride and hybrid run in their own engines, from an image's start.
SWITCHES = ("single", "patch", "cfg", "stadi", "stadi+cfg")


def generate_banded(pipe: Any, spec: DiffusionJobSpec, plan: Plan, ctx: DistContext, prompt: str, seed: int, *,
                    exact: bool, on_step: Callable[[int, int], None] | None, replan_after_warmup: bool,
                    on_replan: Callable[[GenerationResult], None] | None, pace: Pace | None, decode: bool,
                    workspace: Workspace) -> GenerationResult:
    """One image under a banded plan on this rank (see the module's docstring and ``generate.generate``)."""
    ops = ops_for(pipe, spec.model.family)
    guidance = spec.uses_cfg
    with torch.no_grad():
        branches = ops.encode(spec, prompt, guidance)
    steps = spec.steps
    sampler = job_sampler(ops, spec)
    full = initial_noise(ops.latent_shape(spec), seed, sampler.init_noise_sigma)
    timer = StepTimer(ops.device)
    bands = workspace.bands(ops, spec, plan, ctx)
    bands.enter(branches, timer)
    latents = full[..., bands.start:bands.end, :].to(ops.device, ops.dtype)
    warmup = steps if exact else min(plan.warmup_steps, steps)
    result = GenerationResult(image=None, latents=None, step_ms=[], plan=plan)
    fresh = True  # the first step on a share exchanges synchronously: its buffers hold another image's context

    def run(index: int, mode: str) -> None:
        nonlocal latents, fresh
        x_in = sampler.scale(latents, index)
        timer.start()
        # a window start or a synchronous step first waits for the last window's exchange: timed as a wait
        bands.comm.begin_step(sync=exact or index < warmup or fresh, mode=mode, index=index)  # type: ignore[arg-type]
        fresh = False
        if mode == "exchange":
            result.exchanges.append(index)
        eps = bands.eps(x_in, sampler.timesteps[index])
        if pace is not None:
            pace(timer.running_compute_ms())
        timer.stop()
        latents = sampler.step(eps, index, latents)
        result.evals.append(index)
        if on_step is not None:
            on_step(sampler.next_index(index), steps)  # base steps done: the same scale on every rank

    try:
        with torch.no_grad():
            for index in range(0 if bands.idle else warmup):
                run(index, "exchange")
            # a plan with idle ranks is not re-planned: they have no warmup times to measure
            if (replan_after_warmup and 0 < warmup < steps and plan.strategy != "single"
                    and len(plan.active) == plan.world_size):
                # compute time per step: the profiled band step on a GPU (a graphed synchronous step cannot
                # tell computing from waiting), else the median of the warmup steps less their waits
                profiled = bands.profile_ms(sampler.scale(latents, warmup), sampler.timesteps[warmup])
                mine = profiled if profiled is not None else statistics.median(timer.compute_ms()[:warmup])
                # what the ranks run, not what the job asked: the engine options may override it
                compiled = workspace.compiles(spec)
                agreed = replan_together(ctx, spec, bands.plan, mine, compiled_steps=compiled, compiled=compiled,
                                         among=SWITCHES)
                result.measured_speeds, result.predicted_gain = agreed.speeds, agreed.gain
                result.replanned, result.plan = agreed.plan is not None, agreed.plan or bands.plan
                new = agreed.plan
                if new is not None:
                    # bands re-cut once: gather the full latent (and band-shaped scheduler state), re-slice
                    new_start, new_end = new.ranks[ctx.rank].rows
                    old = bands
                    sampler.map_state(lambda t: old.gather_full(t)[..., new_start:new_end, :], like=latents)
                    full_latents = old.gather_full(latents)
                    old.leave()  # settles its exchanges before the bands are re-cut
                    bands = workspace.bands(ops, spec, new, ctx)
                    bands.enter(branches, timer)
                    fresh = True
                    latents = full_latents[..., new_start:new_end, :].contiguous()
                if on_replan is not None and ctx.rank == 0:
                    on_replan(result)
            if not bands.idle:
                cur = bands.plan
                period = 1 if exact else cur.sync_period
                stride = 1 if exact else cur.ranks[ctx.rank].stride
                sampler.set_grid(subgrid(steps, warmup, stride, period))
                for index in sampler.grid[warmup:]:
                    run(index, "exchange" if is_boundary(index, steps, warmup, period) else "local")
    finally:
        bands.leave()
    result.step_ms = timer.ms()
    result.wait_ms = [max(w - c, 0.0) for w, c in zip(result.step_ms, timer.compute_ms(), strict=True)]
    # final latent: gathered by band height over the world (an idle rank 0 still writes the image); rank 0
    # assembles its own group's bands
    bands.hold_idle()
    final = bands.gather_full(latents)
    if bands.idle and on_step is not None:
        on_step(steps, steps)  # the gather waited for the active ranks: the image is done
    if ctx.rank != 0:
        return result
    result.latents = final
    result.image = ops.decode(final) if decode else None
    return result
