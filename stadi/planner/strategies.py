"""Each strategy's best arrangement of one set of GPUs, with its predicted latency (DESIGN section 3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stadi.planner.cost import COLLECTIVE_MS, CostModel
from stadi.planner.patches import bands, elastic_units, equal_units
from stadi.planner.quantize import stride_candidates, stride_cap, sync_period


@dataclass(frozen=True)
class Slot:
    """A GPU the planner may use: where it is and how fast it is (relative to an H100 SXM)."""

    label: str
    speed: float
    node: str | None = None
    index: int | None = None


@dataclass(frozen=True)
class Problem:
    """What is being planned: the work and its cost model."""

    cost: CostModel
    steps: int
    warmup: int
    guidance: bool
    max_stride: int
    min_effective_steps: int

    @property
    def batch(self) -> int:
        return 2 if self.guidance else 1

    @property
    def granules(self) -> int:
        return self.cost.latent_height // self.cost.profile.granularity


@dataclass(frozen=True)
class Assignment:
    """One rank of a candidate."""

    slot: Slot
    rows: tuple[int, int]
    stride: int
    branch: str
    step_ms: float


@dataclass(frozen=True)
class Candidate:
    """A strategy applied to a set of GPUs, with its predicted latency."""

    strategy: str
    seconds: float
    ranks: tuple[Assignment, ...]
    sync_period: int = 1

    def order(self) -> tuple[float, int, int, int]:
        """Lower latency first; ties go to the smaller P, then the smaller sum of strides, then fewer GPUs."""
        return (round(self.seconds, 9), self.sync_period, sum(a.stride for a in self.ranks), len(self.ranks))


def _banded(pb: Problem, slots: Sequence[Slot], units: Sequence[int], strides: Sequence[int], batch: int,
            branch: str) -> tuple[list[Assignment], float, float, float]:
    """Assignments of one group of ranks plus its synchronous-step, stale-step and window times (ms)."""
    cost, g = pb.cost, pb.cost.profile.granularity
    rows = bands(units, g)
    ranks = [
        Assignment(s, r, k, branch, cost.step_ms(r[1] - r[0], batch, s.speed))
        for s, r, k in zip(slots, rows, strides, strict=True)
    ]
    height = cost.latent_height
    comm = max((cost.exchange_ms(height - (a.rows[1] - a.rows[0]), batch) for a in ranks), default=0.0)
    if len(ranks) == 1:
        comm = 0.0
    compute = max(a.step_ms for a in ranks)
    period = sync_period(strides)
    window = max(max(period // a.stride * a.step_ms for a in ranks), comm) + COLLECTIVE_MS
    # Synchronous steps wait for every layer's exchange: the communication is exposed in full.
    sync_step = compute + comm + (COLLECTIVE_MS if len(ranks) > 1 else 0.0)
    return ranks, sync_step, compute, window


def _windowed_seconds(pb: Problem, sync_step: float, window: float, period: int) -> float:
    """W synchronous steps, then (T - W) / P windows."""
    warm = min(pb.warmup, pb.steps)
    return (warm * sync_step + (pb.steps - warm) / period * window) / 1e3


def _elastic(pb: Problem, slots: Sequence[Slot], strides: Sequence[int], batch: int, branch: str,
             ) -> tuple[list[Assignment], float, float, float] | None:
    """Elastic rows for given strides; ranks left without a granule are dropped and the split redone."""
    slots, strides = list(slots), list(strides)
    while slots:
        period = sync_period(strides)
        fixed, per_granule = pb.cost.affine(batch)
        costs: list[Callable[[int], float]] = [
            (lambda u, m=period // k / s.speed, a=fixed, b=per_granule: m * (a + b * u))
            for s, k in zip(slots, strides, strict=True)
        ]
        units = elastic_units(costs, pb.granules)
        if all(units):
            return _banded(pb, slots, units, strides, batch, branch)
        keep = [i for i, u in enumerate(units) if u]
        slots, strides = [slots[i] for i in keep], [strides[i] for i in keep]
    return None


def single(pb: Problem, slots: Sequence[Slot]) -> Candidate | None:
    """The whole image on the fastest GPU."""
    if len(slots) != 1:
        return None
    ranks, _, compute, _ = _banded(pb, slots, [pb.granules], [1], pb.batch, "both")
    return Candidate("single", pb.steps * compute / 1e3, tuple(ranks))


def patch(pb: Problem, slots: Sequence[Slot]) -> Candidate | None:
    """Equal bands, every step, stale activations after warmup (DistriFusion)."""
    if len(slots) < 2 or len(slots) > pb.granules:
        return None
    units = equal_units(len(slots), pb.granules)
    ranks, sync_step, _, window = _banded(pb, slots, units, [1] * len(slots), pb.batch, "both")
    return Candidate("patch", _windowed_seconds(pb, sync_step, window, 1), tuple(ranks))


def cfg(pb: Problem, slots: Sequence[Slot]) -> Candidate | None:
    """Conditional and unconditional branch on one GPU each, predictions swapped every step (Hybridiff)."""
    if not pb.guidance or len(slots) != 2:
        return None
    ranks = [
        Assignment(s, (0, pb.cost.latent_height), 1, branch, pb.cost.step_ms(pb.cost.latent_height, 1, s.speed))
        for s, branch in zip(slots, ("cond", "uncond"), strict=True)
    ]
    step = max(a.step_ms for a in ranks) + pb.cost.latent_exchange_ms()
    return Candidate("cfg", pb.steps * step / 1e3, tuple(ranks))


def stadi(pb: Problem, slots: Sequence[Slot]) -> Candidate | None:
    """Elastic bands and strided sub-grids: the best stride vector by predicted latency."""
    if not 2 <= len(slots) <= pb.granules:
        return None  # more ranks than granules: some would get no band, and a smaller set covers that
    fastest = slots[0].speed
    warm = min(pb.warmup, pb.steps)
    caps = [stride_cap(s.speed, fastest, pb.max_stride, pb.steps, warm, pb.min_effective_steps) for s in slots]
    best: Candidate | None = None
    options = [("elastic", strides) for strides in stride_candidates(caps)]
    # Equal bands with stride 1 are in the search so that stadi can never predict worse than patch.
    options.append(("equal", tuple([1] * len(slots))))
    for kind, strides in options:
        if kind == "equal":
            if len(slots) > pb.granules:
                continue
            units = equal_units(len(slots), pb.granules)
            found = _banded(pb, slots, units, strides, pb.batch, "both")
        else:
            found = _elastic(pb, slots, strides, pb.batch, "both")
        if found is None or len(found[0]) < 2:
            continue
        ranks, sync_step, _, window = found
        period = sync_period([a.stride for a in ranks])
        cand = Candidate("stadi", _windowed_seconds(pb, sync_step, window, period), tuple(ranks), period)
        if best is None or cand.order() < best.order():
            best = cand
    return best


def stadi_cfg(pb: Problem, slots: Sequence[Slot]) -> Candidate | None:
    """Two groups of balanced aggregate speed, one per guidance branch, each with elastic bands."""
    if not pb.guidance or not 2 <= len(slots) <= 2 * pb.granules:
        return None
    groups: tuple[list[Slot], list[Slot]] = ([], [])
    speed = [0.0, 0.0]
    for s in slots:  # fastest first, each to the group with less speed so far
        g = 0 if speed[0] <= speed[1] else 1
        groups[g].append(s)
        speed[g] += s.speed
    parts = []
    for group, branch in zip(groups, ("cond", "uncond"), strict=True):
        found = _elastic(pb, group, [1] * len(group), 1, branch)
        if found is None or len(found[0]) != len(group):
            return None  # a GPU without a band: the smaller set is searched on its own
        parts.append(found)
    sync_step = max(p[1] for p in parts) + pb.cost.latent_exchange_ms()
    window = max(p[3] for p in parts) + pb.cost.latent_exchange_ms()
    ranks = tuple(a for p in parts for a in p[0])
    return Candidate("stadi+cfg", _windowed_seconds(pb, sync_step, window, 1), ranks)


STRATEGIES: dict[str, Callable[[Problem, Sequence[Slot]], Candidate | None]] = {
    "single": single,
    "patch": patch,
    "cfg": cfg,
    "stadi": stadi,
    "stadi+cfg": stadi_cfg,
}
