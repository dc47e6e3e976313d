"""The public entry of the data plane: generate one image under a plan on the ranks of a process group.

Timeline of one image (DESIGN section 4): W synchronous warmup steps, timed per rank; the re-plan (rank 0
turns the measured compute times into speeds, asks the planner for these ranks or a subset of them and
broadcasts the answer; bands are re-cut once when the predicted gain passes ``replanThreshold``; a rank left
out idles for the rest of the image and only joins the final gather); then windows of
P = lcm(strides) base steps in which rank r takes P/k_r steps on its own sub-grid, with one asynchronous
exchange at each window start. When (T - W) is not a multiple of P, the first (T - W) mod P steps after
warmup form a short window in which every rank takes every step (stale, like patch parallelism), so the
full windows that follow all end on the final timestep.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from stadi.api import DiffusionJobSpec, Plan, RankPlan
from stadi.families import profile
from stadi.planner.cost import CostModel
from stadi_worker.bands import Bands, Workspace, guide
from stadi_worker.emulate import Pacer, green_context, slowdown_factor
from stadi_worker.graphs import compile_backend
from stadi_worker.pipelines import FamilyOps, batch_branches, make_scheduler
from stadi_worker.runtime import DistContext, check_plan
from stadi_worker.sampling import BandSampler, StepTimer, denoise_loop, is_boundary, subgrid

log = logging.getLogger(__name__)

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


def initial_noise(shape: tuple[int, int, int], seed: int, sigma: float) -> torch.Tensor:
    """The full initial latent (1, C, H, W), fp32, drawn on the CPU: identical on every rank and device."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=g, dtype=torch.float32) * sigma


def generate_serial(pipe: Any, spec: DiffusionJobSpec, prompt: str, seed: int, *,
                    on_step: Callable[[int, int], None] | None = None, decode: bool = True,
                    workspace: Workspace | None = None, **_: Any) -> GenerationResult:
    """One process, the same loop, no communication: the reference of every parallel run."""
    ops = FamilyOps(pipe, spec.model.family)
    workspace = workspace or Workspace()
    graphs = workspace.graphs_for(ops.device)
    whole = workspace.whole_denoiser(ops, spec)
    guidance = spec.uses_cfg
    order = ["uncond", "cond"] if guidance else ["cond"]
    cond = batch_branches(ops.encode(spec, prompt, guidance), order)
    keys, values = list(cond), list(cond.values())
    sampler = BandSampler(make_scheduler(pipe, spec.model.family, spec.scheduler), spec.steps, ops.device)
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


def step_cost_at_unit_speed(plan: Plan, rank: int, guidance: bool, compiled: bool = False) -> float:
    """The family's affine cost (ms at speed 1.0, the catalogue's scale) of one step of ``rank``'s band;
    ``compiled``: the job compiles whole-frame steps, so a rank owning the whole frame runs them compiled.

    Without the planner's ``band_exchange_ms``: the times it is matched with are compute alone (the profiled
    local step runs no collective; warmup steps less their waits)."""
    r = plan.ranks[rank]
    batch = (2 if guidance else 1) if r.branch == "both" else 1
    whole = compiled and r.height == plan.latent_height
    cost = CostModel(profile(plan.family), plan.latent_height, plan.latent_width, 0.0, compiled=whole)
    return cost.step_ms(r.height, batch, 1.0)


def measured_speeds(plan: Plan, compute_ms: list[float], guidance: bool, compiled: bool = False) -> list[float]:
    """Speeds comparable to the catalogue's: invert c_r(h) = (alpha + beta*b*h*W/128) / v_r (times the
    compiled share for whole-frame steps of a compiled job)."""
    return [step_cost_at_unit_speed(plan, r, guidance, compiled) / max(ms, 1e-6)
            for r, ms in enumerate(compute_ms)]


def _link(plan: Plan) -> float:
    """The link the planner assumes for these ranks (CPU ranks: PCIe, as ``stadi run`` plans them)."""
    from stadi.planner import LINKS, default_link

    if any(r.gpu.upper().startswith("CPU") for r in plan.ranks):
        return LINKS["pcie"]
    return default_link((r.gpu, r.node) for r in plan.ranks)


def in_process_order(fresh: Plan, gpu_indices: list[int | None]) -> Plan:
    """``fresh`` with its ranks renumbered for processes that already run: the planner numbers ranks fastest
    first; process r drives the device ``gpu_indices[r]`` (ranks are matched by the device index they
    were planned for)."""
    by_proc = sorted(fresh.ranks, key=lambda r: r.gpu_index if r.gpu_index is not None else r.rank)
    ranks = [r.model_copy(update={"rank": i, "gpu_index": gpu_indices[i]}) for i, r in enumerate(by_proc)]
    return fresh.model_copy(update={"ranks": ranks})


def onto_gang(fresh: Plan, gang: Plan, speeds: list[float]) -> Plan:
    """``fresh``, planned on a pool that offered process r as device index r, laid onto the processes of
    ``gang`` in order: each keeps its device; a process the planner left out stays, idle (rows [0, 0)), and
    is named in ``left_out`` after the GPUs the gang's own plan left out."""
    by_proc = {r.gpu_index: r for r in fresh.ranks}
    ranks = [by_proc[g.rank].model_copy(update={"rank": g.rank, "gpu_index": g.gpu_index}) if g.rank in by_proc
             else RankPlan(rank=g.rank, gpu=g.gpu, node=g.node, gpu_index=g.gpu_index, speed=speeds[g.rank],
                           rows=(0, 0), idle=True)
             for g in gang.ranks]
    left_out = gang.left_out + [r.device for r in ranks if r.idle]
    return fresh.model_copy(update={"ranks": ranks, "left_out": left_out})


def replan(spec: DiffusionJobSpec, plan: Plan, speeds: list[float], *, threshold: float | None = None,
           **request_changes: Any) -> tuple[Plan | None, float]:
    """Ask the planner for these ranks at ``speeds``, or for a subset of at least the job's
    ``parallelism.gpus.min`` of them where the strategy allows fewer (``request_changes`` override fields of
    the planner's request, e.g. the strategy).

    Returns (the new plan with every rank in process order, those left out idle, or None when it is the same
    or its predicted gain does not pass ``threshold``, by default ``replanThreshold``; the gain). Pure and
    deterministic: run on rank 0 and broadcast.
    """
    from dataclasses import replace

    from stadi.planner import Device, PlanRequest
    from stadi.planner import plan as run_planner
    from stadi.planner.evaluate import predict_seconds

    link = _link(plan)
    world = plan.world_size
    request = replace(PlanRequest.from_spec(spec, link), gpus_min=min(spec.parallelism.gpus.min, world),
                      gpus_max=world, warmup_steps=plan.warmup_steps, **request_changes)
    pool = [Device(r.gpu, node=r.node, index=r.rank, speed=speeds[r.rank]) for r in plan.ranks]
    try:
        fresh = run_planner(request, pool)
    except ValueError as error:
        log.warning("re-plan failed; keeping the plan", extra={"error": str(error)})
        return None, 0.0
    if fresh.strategy == "hybrid" and fresh.world_size != world:
        return None, 0.0  # its two stages are not built to run beside an idle rank (hybrid.py)
    fresh = onto_gang(fresh, plan, speeds)
    fresh.validate_for(world)
    args = (plan.warmup_steps, request.max_stride, request.min_effective_steps, link)
    old_s = predict_seconds(plan, speeds, *args, compiled=request.compiled)
    new_s = predict_seconds(fresh, speeds, *args, compiled=request.compiled)
    gain = (old_s - new_s) / old_s if old_s > 0 else 0.0

    def shares(p: Plan) -> list[tuple[Any, ...]]:
        return [(r.rows, r.stride, r.branch, r.layers, r.idle) for r in p.ranks]

    limit = spec.parallelism.replan_threshold if threshold is None else threshold
    if shares(fresh) == shares(plan) or gain <= limit:
        return None, gain
    return fresh, gain


def _period(plan: Plan, exact: bool) -> int:
    return 1 if exact else math.lcm(*(r.stride for r in plan.active))


def generate(pipe: Any, spec: DiffusionJobSpec, plan: Plan, ctx: DistContext, prompt: str, seed: int, *,
             exact: bool = False, on_step: Callable[[int, int], None] | None = None,
             replan_after_warmup: bool = False, on_replan: Callable[[GenerationResult], None] | None = None,
             slowdown: float | None = None, decode: bool = True,
             workspace: Workspace | None = None) -> GenerationResult:
    """Generate one image of ``prompt`` under ``plan``; call on every rank of the group.

    Each rank denoises its band of latent rows; the first ``plan.warmup_steps`` steps (all of them with
    ``exact``, which also ignores strides) exchange fresh activations at every layer; later steps run on
    each rank's strided sub-grid with the other bands' activations from the last exchange. With
    ``replan_after_warmup`` the warmup is profiled and the plan may change (``on_replan`` gets the measured
    speeds and the new plan on rank 0), also to one that leaves ranks idle. An idle rank runs no step (from
    the start under a plan that marks it idle, as a job's later images); ``on_step`` hears of it when the
    image is done. ``slowdown`` (default: env STADI_SLOWDOWN) emulates a slower device, for tests and
    benchmarks. The final latent is gathered from the active ranks' bands on every rank, idle ones
    included, and (unless ``decode`` is False, as in the speed benchmark) decoded on rank 0, idle or not.
    Pass one ``workspace`` to every call on the same pipeline so the band wrappers and CUDA graphs of a
    plan are built once.
    """
    check_plan(plan, spec, ctx)
    workspace = workspace or Workspace()
    if ctx.world_size == 1:
        return generate_serial(pipe, spec, prompt, seed, on_step=on_step, decode=decode, workspace=workspace)
    factor = slowdown if slowdown is not None else slowdown_factor(ctx.rank)
    with green_context(factor, ctx.device):
        if plan.strategy == "hybrid":
            from stadi_worker.hybrid import generate_hybrid  # it imports this module

            return generate_hybrid(pipe, spec, plan, ctx, prompt, seed, exact=exact, on_step=on_step,
                                   replan_after_warmup=replan_after_warmup, on_replan=on_replan,
                                   pacer=Pacer(factor, ctx.device), decode=decode, workspace=workspace)
        return _generate(pipe, spec, plan, ctx, prompt, seed, exact, on_step, replan_after_warmup, on_replan,
                         Pacer(factor, ctx.device), decode, workspace)


def _generate(pipe: Any, spec: DiffusionJobSpec, plan: Plan, ctx: DistContext, prompt: str, seed: int,
              exact: bool, on_step: Callable[[int, int], None] | None, replan_after_warmup: bool,
              on_replan: Callable[[GenerationResult], None] | None, pacer: Pacer,
              decode: bool, workspace: Workspace) -> GenerationResult:
    ops = FamilyOps(pipe, spec.model.family)
    guidance = spec.uses_cfg
    branches = ops.encode(spec, prompt, guidance)
    steps = spec.steps
    sampler = BandSampler(make_scheduler(pipe, spec.model.family, spec.scheduler), steps, ops.device)
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
        bands.comm.begin_step(sync=exact or index < warmup or fresh, mode=mode)  # type: ignore[arg-type]
        fresh = False
        if mode == "exchange":
            result.exchanges.append(index)
        timer.start()
        eps = bands.eps(x_in, sampler.timesteps[index])
        if pacer.active:
            pacer.pace(timer.running_compute_ms())
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
                profiled = bands.profile_ms(sampler.scale(latents, warmup), sampler.timesteps[warmup])
                new, result = _replan_step(spec, bands, timer, warmup, result, ctx, profiled)
                if new is not None:
                    # bands re-cut once: gather the full latent (and band-shaped scheduler state), re-slice
                    new_start, new_end = new.ranks[ctx.rank].rows
                    old = bands
                    sampler.map_state(lambda t: old.gather_full(t)[..., new_start:new_end, :], like=latents)
                    full_latents = old.gather_full(latents)
                    old.leave()
                    bands = workspace.bands(ops, spec, new, ctx)
                    bands.enter(branches, timer)
                    fresh = True
                    latents = full_latents[..., new_start:new_end, :].contiguous()
                if on_replan is not None and ctx.rank == 0:
                    on_replan(result)
            if not bands.idle:
                cur = bands.plan
                period = _period(cur, exact)
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


def _replan_step(spec: DiffusionJobSpec, bands: Bands, timer: StepTimer, warmup: int, result: GenerationResult,
                 ctx: DistContext, profiled: float | None) -> tuple[Plan | None, GenerationResult]:
    """Compute time per step on every rank (the profiled band step on a GPU, else the median of the warmup
    steps less their waits) -> speeds; rank 0 plans; everyone gets its answer."""
    mine = profiled if profiled is not None else statistics.median(timer.compute_ms()[:warmup])
    times: list[float] = [0.0] * ctx.world_size
    dist.all_gather_object(times, mine)
    plan = bands.plan
    # what the ranks run, not what the job asked: STADI_COMPILE may override it
    compiled = compile_backend(spec.model.compile) is not None
    speeds = measured_speeds(plan, times, spec.uses_cfg, compiled)
    box: list[Any] = [None]
    if ctx.rank == 0:
        new, gain = replan(spec, plan, speeds, compiled=compiled)
        box = [(new.model_dump_json() if new is not None else None, gain)]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    new_json, gain = box[0]
    new = Plan.model_validate_json(new_json) if new_json is not None else None
    result.measured_speeds = [round(v, 6) for v in speeds]
    result.predicted_gain = round(gain, 6)
    result.replanned = new is not None
    result.plan = new or plan
    log.info("re-plan", extra={"speeds": result.measured_speeds, "gain": result.predicted_gain,
                               "replanned": result.replanned})
    return new, result
