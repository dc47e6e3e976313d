"""The start-up check of a plan against the job and the gang, on every rank before any collective."""

from __future__ import annotations

from stadi.api import BRANCH_STRIDES, DiffusionJobSpec, Plan
from stadi.families import profile
from stadi_worker.engine.runtime import DistContext


def check_plan(plan: Plan, spec: DiffusionJobSpec, ctx: DistContext) -> None:
    """Raise ValueError when ``plan`` cannot run ``spec`` on this gang.

    Purely local and deterministic: every rank reaches the same verdict before any collective, so a bad
    plan fails on all of them at once instead of leaving some waiting in a collective.
    """
    try:
        _check(plan, spec, ctx)
    except ValueError as err:
        raise ValueError(f"rank {ctx.rank}: plan rejected: {err}") from None


def _check(plan: Plan, spec: DiffusionJobSpec, ctx: DistContext) -> None:
    family = spec.model.family
    fam = profile(family)
    if plan.family != family:
        raise ValueError(f"plan is for family {plan.family!r} but the job runs {family!r}")
    if plan.world_size != ctx.world_size:
        raise ValueError(f"plan has {plan.world_size} ranks but the world size is {ctx.world_size}")
    lat_h, lat_w = spec.height // fam.vae_factor, spec.width // fam.vae_factor
    if (plan.latent_height, plan.latent_width) != (lat_h, lat_w):
        raise ValueError(f"plan latent size {plan.latent_height}x{plan.latent_width} differs from the job's "
                         f"{lat_h}x{lat_w} ({spec.height}x{spec.width} px / {fam.vae_factor})")
    if plan.granularity % fam.granularity:
        raise ValueError(f"plan granularity {plan.granularity} is not a multiple of the {family} band "
                         f"granularity {fam.granularity} latent rows")
    plan.validate_for(ctx.world_size)
    for r in plan.ranks:  # validate_for checks the plan's own granularity; the family's is what the model needs
        if r.rows[0] % fam.granularity or r.rows[1] % fam.granularity:
            raise ValueError(f"rank {r.rank} band {list(r.rows)} is not a multiple of the {family} granularity "
                             f"{fam.granularity} latent rows")
    if plan.steps != spec.steps:
        raise ValueError(f"plan has {plan.steps} steps but the job asks for {spec.steps}")
    if plan.warmup_steps > spec.steps:
        raise ValueError(f"plan warmup {plan.warmup_steps} exceeds the {spec.steps} steps")
    active = plan.active
    branches = {r.branch for r in active}
    if plan.strategy in BRANCH_STRIDES:
        _check_branch_stride(plan)
    elif any(r.stride != 1 for r in active) and branches != {"both"}:
        # a condition split swaps predictions at every step: every rank must take every step
        raise ValueError(f"strides > 1 need a plan without condition split; strides: {[r.stride for r in active]}")
    if branches != {"both"}:
        if "both" in branches or branches != {"cond", "uncond"}:
            raise ValueError(f"a condition-split plan needs ranks of both branches cond and uncond and no "
                             f"'both': got {sorted(branches)}")
        if not spec.uses_cfg:
            raise ValueError("a condition-split plan needs guidanceScale > 1")
    if plan.strategy == "single" and len(active) != 1:
        raise ValueError(f"strategy single runs on one rank; this plan has {len(active)} active ranks")


def _check_branch_stride(plan: Plan) -> None:
    """Branch strides (cfg-stride, cfg-stride+band): two ranks, one per branch, the cond rank over the whole
    frame at stride 1 (``Plan.validate_for`` has checked that the uncond branch's bands tile the frame)."""
    ranks = plan.ranks
    name = plan.strategy
    if len(ranks) != 2 or any(r.idle for r in ranks) or {r.branch for r in ranks} != {"cond", "uncond"}:
        raise ValueError(f"strategy {name} needs 2 ranks, none idle, one per branch cond and uncond")
    cond = next(r for r in ranks if r.branch == "cond")
    if cond.stride != 1 or cond.rows != (0, plan.latent_height):
        raise ValueError(f"strategy {name} steps the whole latent on the cond rank: its stride must be 1 and its "
                         f"rows [0, {plan.latent_height}), not stride {cond.stride} and rows {list(cond.rows)}")
