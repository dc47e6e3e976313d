"""The re-plan after warmup: measured step times into speeds, the planner asked again, the answer agreed.

Pure parts (``measured_speeds``, ``replan``) are deterministic functions of the plan and the times; the
collective part (``replan_together``) gathers every rank's time, lets rank 0 plan and broadcasts its answer, so
every rank adopts the same plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch.distributed as dist

from stadi.api import DiffusionJobSpec, Plan, RankPlan
from stadi.families import profile
from stadi.planner import LINKS, Device, PlanRequest, default_link
from stadi.planner import plan as run_planner
from stadi.planner.cost import CostModel
from stadi.planner.evaluate import predict_seconds
from stadi_worker.engine.runtime import DistContext

log = logging.getLogger(__name__)


def step_cost_at_unit_speed(plan: Plan, rank: int, guidance: bool, compiled: bool = False) -> float:
    """The family's affine cost (ms at speed 1.0, the catalogue's scale) of one step of ``rank``'s band;
    ``compiled``: the step measured ran compiled (whole frame or band, each at its own compiled share).

    Without the planner's ``band_exchange_ms``: the times it is matched with are compute alone (the profiled
    local step runs no collective; warmup steps less their waits)."""
    r = plan.ranks[rank]
    batch = (2 if guidance else 1) if r.branch == "both" else 1
    cost = CostModel(profile(plan.family), plan.latent_height, plan.latent_width, 0.0, compiled=compiled)
    return cost.compute_ms(r.height, batch, 1.0, banded=r.height != plan.latent_height, text=plan.computes_text(rank))


def measured_speeds(plan: Plan, compute_ms: list[float], guidance: bool, compiled: bool = False) -> list[float]:
    """Speeds comparable to the catalogue's: invert c_r(h) = (alpha + beta*b*h*W/128) / v_r (times the
    compiled share for whole-frame steps of a compiled job)."""
    return [step_cost_at_unit_speed(plan, r, guidance, compiled) / max(ms, 1e-6)
            for r, ms in enumerate(compute_ms)]


def _link(plan: Plan) -> float:
    """The link the planner assumes for these ranks (CPU ranks: PCIe, as ``stadi run`` plans them)."""
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
    old_s = predict_seconds(plan, speeds, *args, compiled=request.compiled, exchange=request.exchange)
    new_s = predict_seconds(fresh, speeds, *args, compiled=request.compiled, exchange=request.exchange)
    gain = (old_s - new_s) / old_s if old_s > 0 else 0.0

    def shares(p: Plan) -> list[tuple[Any, ...]]:
        return [(r.rows, r.stride, r.branch, r.layers, r.idle) for r in p.ranks]

    limit = spec.parallelism.replan_threshold if threshold is None else threshold
    if shares(fresh) == shares(plan) or gain <= limit:
        return None, gain
    return fresh, gain


@dataclass(frozen=True)
class Agreed:
    """The outcome of a re-plan every rank agreed on."""

    speeds: list[float]  # per rank, on the catalogue's scale
    plan: Plan | None  # the new plan, or None: keep the current one
    gain: float  # (old - new) / old predicted seconds at these speeds


def replan_together(ctx: DistContext, spec: DiffusionJobSpec, plan: Plan, compute_ms: float, *,
                    compiled_steps: bool = False, measured_on: Plan | None = None, **replan_args: Any) -> Agreed:
    """Collective: every rank's compute time per step (``compute_ms``, of a step that ``compiled_steps`` or
    not, of its share under ``measured_on``, by default ``plan``) -> speeds; rank 0 re-plans (``replan`` with
    ``replan_args``) and every rank adopts its answer."""
    times: list[float] = [0.0] * ctx.world_size
    dist.all_gather_object(times, compute_ms)
    speeds = measured_speeds(measured_on or plan, times, spec.uses_cfg, compiled_steps)
    box: list[Any] = [None]
    if ctx.rank == 0:
        new, gain = replan(spec, plan, speeds, **replan_args)
        box = [(new.model_dump_json() if new is not None else None, gain)]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    new_json, gain = box[0]
    agreed = Agreed([round(v, 6) for v in speeds], Plan.model_validate_json(new_json) if new_json else None,
                    round(gain, 6))
    log.info("re-plan", extra={"strategy": plan.strategy, "speeds": agreed.speeds, "gain": agreed.gain,
                               "replanned": agreed.plan is not None})
    return agreed
