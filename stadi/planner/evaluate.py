"""Predicted latency of an existing plan at given (measured) speeds: the worker's re-plan compares it with
the planner's fresh answer to decide whether re-cutting the bands pays (``replanThreshold``)."""

from __future__ import annotations

from collections.abc import Sequence

from stadi.api import Plan
from stadi.families import HybridSchedule, profile
from stadi.planner.cost import DEFAULT_EXCHANGE, CostModel, Exchange
from stadi.planner.hybrid import StageCut, hybrid_seconds
from stadi.planner.stage_split import reference_units
from stadi.planner.strategies import (
    Group,
    Problem,
    Slot,
    _times,
    _windowed_seconds,
    cfg_stride_band_seconds,
    cfg_stride_seconds,
)


def predict_seconds(plan: Plan, speeds: Sequence[float], warmup: int, max_stride: int, min_effective: int,
                    link_gbytes_per_s: float, compiled: bool = False, exchange: Exchange = DEFAULT_EXCHANGE
                    ) -> float:
    """Seconds the planner's cost model predicts for ``plan`` with rank ``r`` at ``speeds[r]`` (the same
    formulas the strategies use to rank candidates; idle ranks cost nothing; ``compiled``: the job's steps
    are; ``exchange``: the engine's band exchange, ``cost.EXCHANGES``)."""
    if len(speeds) != len(plan.ranks) or any(v <= 0 for v in speeds):
        raise ValueError(f"need one positive speed per rank, got {list(speeds)}")
    fam = profile(plan.family)
    cost = CostModel(fam, plan.latent_height, plan.latent_width, link_gbytes_per_s, compiled, exchange)
    if plan.strategy == "hybrid":
        return _hybrid_seconds(plan, cost, speeds)
    pb = Problem(cost, plan.steps, warmup, plan.guidance, max_stride, min_effective, fixed_link=True)
    if plan.strategy == "cfg-stride+band":
        cond, uncond = sorted(plan.ranks, key=lambda r: r.branch != "cond")
        return cfg_stride_band_seconds(pb, Slot(cond.gpu, speeds[cond.rank]), Slot(uncond.gpu, speeds[uncond.rank]),
                                       (cond.uncond_rows or (0, 0))[1] // fam.granularity, uncond.stride)
    groups = []
    active = plan.active
    for branch in sorted({r.branch for r in active}):
        ranks = sorted((r for r in active if r.branch == branch), key=lambda r: r.rows[0])
        groups.append(Group(
            tuple(Slot(r.gpu, speeds[r.rank], r.node, r.rank) for r in ranks),
            tuple(r.height // fam.granularity for r in ranks),
            tuple(r.stride for r in ranks),
            branch,
            pb.batch if branch == "both" else 1,
        ))
    times = [_times(pb, g) for g in groups]
    if plan.strategy == "single":
        return plan.steps * times[0][0] / 1e3
    swap = cost.latent_exchange_ms() if len(groups) > 1 else 0.0
    if plan.strategy == "cfg":
        return plan.steps * (max(t[0] for t in times) + swap) / 1e3
    if plan.strategy == "cfg-stride":  # groups in branch order: cond, uncond
        return cfg_stride_seconds(pb, times[0][0], times[1][0], groups[1].strides[0])
    return _windowed_seconds(pb, max(t[0] for t in times) + swap, max(t[1] for t in times) + swap,
                             plan.sync_period)


def _hybrid_seconds(plan: Plan, cost: CostModel, speeds: Sequence[float]) -> float:
    h = plan.hybrid
    if h is None:
        raise ValueError("a hybrid plan needs its hybrid schedule")
    units = reference_units(plan.family, plan.latent_height, plan.latent_width)
    stage0 = next(r.rank for r in plan.ranks if r.layers is not None and r.layers[0] == 0)
    boundary = plan.ranks[stage0].layers[1]  # type: ignore[index]
    schedule = HybridSchedule(h.window, h.slope_threshold, h.pipeline_steps, h.cap_step)
    return hybrid_seconds(cost, plan.steps, schedule, units, speeds,
                          StageCut(stage0, boundary, len(units), units[boundary].name))
