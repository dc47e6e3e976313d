"""The STADI planner: pure and deterministic. A pool of GPUs and a job in, a Plan out (docs/architecture.md,
"The planner")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from stadi import gpus
from stadi.api import QUALITIES, DiffusionJobSpec, Plan, Quality
from stadi.families import HYBRID_DEFAULTS, HybridSchedule, profile
from stadi.planner.cost import DEFAULT_EXCHANGE, EXCHANGES, LINKS, CostModel, Exchange, default_link
from stadi.planner.fidelity import DEFAULT_QUALITY
from stadi.planner.search import Limits, search, to_plan
from stadi.planner.strategies import Problem, Slot

__all__ = ["LINKS", "Device", "Plan", "PlanRequest", "default_link", "plan", "plan_job"]


@dataclass(frozen=True)
class Device:
    """One GPU offered to the planner. `speed` (measured, relative to an H100 SXM) overrides the catalogue
    speed times (1 - load)."""

    product: str
    load: float = 0.0
    node: str | None = None
    index: int | None = None
    speed: float | None = None

    def effective_speed(self) -> float:
        if self.speed is not None:
            return self.speed
        return gpus.resolve(self.product).speed * (1.0 - min(max(self.load, 0.0), 1.0))


@dataclass(frozen=True)
class PlanRequest:
    """The job as the planner sees it."""

    family: str
    height: int  # pixels
    width: int
    steps: int = 50
    guidance: bool = True
    strategy: str = "auto"
    warmup_steps: int = 4
    max_stride: int = 4
    min_effective_steps: int = 20
    gpus_min: int = 1
    gpus_max: int = 8
    link_gbytes_per_s: float | None = None
    hybrid: HybridSchedule | None = None  # strategy hybrid's schedule; None: the family's defaults
    compiled: bool = False  # steps compiled (spec.model.compile): they cost less
    quality: Quality = DEFAULT_QUALITY  # the fidelity classes auto may pick (spec.parallelism.quality)
    # the strategies auto may choose (None: every one): a re-plan offers only those its engine can switch to
    among: tuple[str, ...] | None = None
    exchange: Exchange = DEFAULT_EXCHANGE  # the engine's band exchange (cost.EXCHANGES): "per-layer" replays
    # the measurements taken before issue 16

    @classmethod
    def from_spec(cls, spec: DiffusionJobSpec, link_gbytes_per_s: float | None = None) -> PlanRequest:
        p = spec.parallelism
        return cls(
            family=spec.model.family,
            height=spec.height,
            width=spec.width,
            steps=spec.steps,
            guidance=spec.uses_cfg,
            strategy=p.strategy,
            warmup_steps=spec.warmup_steps,
            max_stride=p.max_stride,
            min_effective_steps=spec.min_effective_steps,
            gpus_min=p.gpus.min,
            gpus_max=p.gpus.max,
            link_gbytes_per_s=link_gbytes_per_s,
            hybrid=spec.hybrid_schedule,
            compiled=spec.model.compile,
            quality=p.quality,
        )


def plan(request: PlanRequest, pool: Sequence[Device]) -> Plan:
    """The plan with the minimum predicted latency among those the request's quality admits (or the fastest
    plan of the requested strategy, whatever its fidelity).

    Raises ValueError naming the problem when no plan fits (no usable GPU, too few GPUs, strategy needs
    guidance, size not a multiple of the granularity, nothing within the quality).
    """
    try:
        fam = profile(request.family)
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    for name, value in (("height", request.height), ("width", request.width)):
        if value <= 0 or value % fam.pixel_multiple:
            raise ValueError(
                f"{name} {value} is not a positive multiple of {fam.pixel_multiple} for {request.family}"
            )
    for name, value, low in (
        ("steps", request.steps, 1),
        ("warmup steps", request.warmup_steps, 0),
        ("max stride", request.max_stride, 1),
        ("min effective steps", request.min_effective_steps, 1),
        ("gpus min", request.gpus_min, 1),
        ("gpus max", request.gpus_max, request.gpus_min),
    ):
        if value < low:
            raise ValueError(f"{name} is {value}; it must be >= {low}")
    slots = sorted(
        (
            Slot(d.product, d.effective_speed(), d.node, d.index)
            for d in pool
        ),
        key=lambda s: (-s.speed, s.label, s.node or "", s.index if s.index is not None else -1),
    )
    idle = [s for s in slots if s.speed <= 0]
    slots = [s for s in slots if s.speed > 0]
    if not slots:
        raise ValueError("no usable GPU: the pool is empty or every GPU is fully loaded")
    if len(slots) < request.gpus_min:
        raise ValueError(
            f"parallelism.gpus.min is {request.gpus_min} but the pool has {len(slots)} usable GPU(s)"
        )
    for name, value, allowed in (("quality", request.quality, QUALITIES), ("exchange", request.exchange, EXCHANGES)):
        if value not in allowed:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
    link = request.link_gbytes_per_s
    if link is not None and not (math.isfinite(link) and link > 0):
        raise ValueError(f"link bandwidth {link} GB/s must be a finite number > 0")
    cost = CostModel(fam, request.height // fam.vae_factor, request.width // fam.vae_factor, link or 0.0,
                     request.compiled, request.exchange)
    pb = Problem(cost, request.steps, request.warmup_steps, request.guidance, request.max_stride,
                 request.min_effective_steps, fixed_link=link is not None,
                 hybrid=(request.hybrid or HYBRID_DEFAULTS[request.family]) if request.family in HYBRID_DEFAULTS
                 else None)
    chosen, best = search(pb, slots, Limits(request.strategy, request.gpus_min, request.gpus_max, request.quality,
                                                request.among))
    return to_plan(pb, chosen, best, slots + idle)


def plan_job(spec: DiffusionJobSpec, pool: Sequence[Device], link_gbytes_per_s: float | None = None) -> Plan:
    """Plan a DiffusionJob's spec on a pool of devices."""
    return plan(PlanRequest.from_spec(spec, link_gbytes_per_s), pool)
