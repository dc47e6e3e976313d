"""Each strategy's best arrangement of one set of GPUs, with its predicted latency (docs/architecture.md, "The
planner")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from stadi.families import HybridSchedule
from stadi.planner.cost import COLLECTIVE_MS, CostModel, default_link
from stadi.planner.hybrid import StageCut, best_cut, hybrid_seconds
from stadi.planner.patches import bands, elastic_units, equal_units
from stadi.planner.quantize import stride_candidates, stride_cap, sync_period
from stadi.planner.stage_split import reference_units


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
    fixed_link: bool = False
    hybrid: HybridSchedule | None = None  # None: the family has no stage split

    def on(self, slots: Sequence[Slot]) -> Problem:
        """This problem on a set of GPUs: unless the link was given, it is the slowest among those GPUs."""
        if self.fixed_link:
            return self
        link = default_link((s.label, s.node) for s in slots)
        return replace(self, cost=replace(self.cost, link_gbytes_per_s=link))

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
    layers: tuple[int, int] | None = None


@dataclass(frozen=True)
class Group:
    """Ranks that together cover the whole latent for one guidance branch (or both, batched)."""

    slots: tuple[Slot, ...]
    units: tuple[int, ...]  # granules of rows per rank, in band order
    strides: tuple[int, ...]
    branch: str
    batch: int
    layers: tuple[int, int] | None = None  # hybrid: the one rank's stage in the pipeline window

    @property
    def banded(self) -> bool:
        """Whether the ranks split the rows: then they exchange band context (``CostModel.affine``)."""
        return len(self.slots) > 1

    def assignments(self, cost: CostModel) -> list[Assignment]:
        rows = bands(self.units, cost.profile.granularity)
        return [
            Assignment(s, r, k, self.branch, cost.step_ms(r[1] - r[0], self.batch, s.speed, self.banded, text=t),
                       self.layers)
            for s, r, k, t in zip(self.slots, rows, self.strides, cost.texts(self.strides), strict=True)
        ]


@dataclass(frozen=True)
class Candidate:
    """A strategy applied to a set of GPUs, with its predicted latency."""

    strategy: str
    seconds: float
    groups: tuple[Group, ...]
    sync_period: int = 1
    cut: StageCut | None = None  # hybrid
    shared: int = 0  # cfg-stride+band: granules of the uncond branch's rows (the top ones) the cond rank evaluates

    def order(self) -> tuple[float, int, int, int]:
        """Lower latency first; ties go to the smaller P, then the smaller sum of strides, then fewer GPUs."""
        strides = [k for g in self.groups for k in g.strides]
        return (round(self.seconds, 9), self.sync_period, sum(strides), len(strides))

    def ranks(self, cost: CostModel) -> list[Assignment]:
        return [a for g in self.groups for a in g.assignments(cost)]


def _window_busy(steps: Sequence[float], strides: Sequence[int], drag: float) -> list[float]:
    """Each rank's busy time in one window of P = lcm(strides) base steps: rank r runs n_r = P / k_r steps
    of c_r = ``steps[r]`` ms, and only the first (the window start) exchanges.

    After it, rank r runs l_r = (n_r - 1) * c_r ms of local steps, so the rank of the longest run, L = max l,
    reaches the next window start last. With the per-layer exchange every other rank's exchange there waits
    L - l_r for it with its collectives pending, which hold SMs of its GPU: the rank's step runs at (1 - drag)
    of its pace meanwhile (``FamilyProfile.window_wait_drag``), so busy_r = n_r * c_r + drag * (L - l_r).
    With the bucketed exchange (drag 0) or stride 1 everywhere nothing waits: busy_r = n_r * c_r. (A rank
    whose step would end within its wait is not the busiest either way.)
    """
    period = sync_period(strides)
    if period == 1:
        return list(steps)
    local = [(period // k - 1) * t for k, t in zip(strides, steps, strict=True)]
    last = max(local)
    return [lo + t + drag * (last - lo) for t, lo in zip(steps, local, strict=True)]


def _times(pb: Problem, group: Group) -> tuple[float, float]:
    """A group's synchronous-step time and window time (ms).

    Synchronous steps wait for every layer's exchange, so there the communication is exposed in full (and
    each banded step pays ``band_exchange_ms``). A window costs its busiest rank's P / k_r steps
    (``_window_busy``) or the exchange, whichever is longer, plus one collective:
    - per-layer exchange: each layer's collective overlaps the layers after it in the window-start step, so
      the window is max(busiest, exchange);
    - bucketed exchange: the one all_gather starts once the last rank has finished its window-start step
      (with its staging copies) and is waited for at the next window start, so it overlaps the local steps
      only: the window is max(busiest, slowest window-start step + exchange). With stride 1 everywhere (patch)
      nothing overlaps it.
    """
    cost = pb.cost
    fixed = _fixed(cost, group.strides, group.batch, group.banded)
    per_granule = cost.affine(group.batch, group.banded)[1]
    steps = [(f + per_granule * u) / s.speed for f, s, u in zip(fixed, group.slots, group.units, strict=True)]
    if len(steps) == 1:
        return steps[0], steps[0]
    granularity = cost.profile.granularity
    sync_extra = (cost.affine(group.batch, group.banded, synchronous=True)[0]
                  - cost.affine(group.batch, group.banded)[0])
    sync = max(t + sync_extra / s.speed for t, s in zip(steps, group.slots, strict=True))
    # granules each rank sends and receives per exchange: its rows, the others'; the shared text stream's keys and
    # values go from the rank that computes them to the others
    text = cost.text_rows() / granularity
    sent = [u + text * t for u, t in zip(group.units, cost.texts(group.strides), strict=True)]
    received = [sum(sent) - own for own in sent]
    comm = cost.exchange_ms(max(received) * granularity, group.batch)
    per_granule_staging = cost.staging_ms(granularity, group.batch, 1.0)  # linear in rows and 1 / speed
    period = sync_period(group.strides)
    # a window start stages what it sends, and first settles the last exchange: the rest copied to where the layers
    # read it, and on a rank with local steps also extrapolated (a lerp: 1.5 copies' traffic)
    starts = [t + per_granule_staging * (out + into * (1.0 + 1.5 * (period > k))) / s.speed
              for t, s, out, into, k in zip(steps, group.slots, sent, received, group.strides, strict=True)]
    busy = max(b + a - t for b, a, t in zip(_window_busy(steps, group.strides, cost.window_drag), starts, steps,
                                            strict=True))
    exchange = comm if cost.exchange == "per-layer" else max(starts) + comm
    return sync + comm + COLLECTIVE_MS, max(busy, exchange) + COLLECTIVE_MS


def _fixed(cost: CostModel, strides: Sequence[int], batch: int, banded: bool) -> list[float]:
    """Each band's fixed cost per step (in band order): the family's, less the shared text stream on the bands
    that do not compute it (``CostModel.texts``)."""
    return [cost.affine(batch, banded, text=t)[0] for t in cost.texts(strides)]


def _windowed_seconds(pb: Problem, sync_step: float, window: float, period: int) -> float:
    """W synchronous steps, then (T - W) / P windows."""
    warm = min(pb.warmup, pb.steps)
    return (warm * sync_step + (pb.steps - warm) / period * window) / 1e3


def _multipliers(pb: Problem, slots: Sequence[Slot], strides: Sequence[int]) -> list[float]:
    """Each rank's weight m_r in the elastic split, which equalises m_r * (fixed + per_granule * u_r).

    By ``_window_busy`` a rank's window time is (n_r - drag * (n_r - 1)) * c_r + drag * L with n_r = P / k_r,
    the last term the same for every rank: equal window times need equal (n_r - drag * (n_r - 1)) * c_r
    (n_r * c_r with the bucketed exchange, whose drag is 0), c_r being the step time at speed 1 over the
    rank's speed.
    """
    period = sync_period(strides)
    drag = pb.cost.window_drag
    return [(period // k - drag * (period // k - 1)) / s.speed for s, k in zip(slots, strides, strict=True)]


def _elastic(pb: Problem, slots: Sequence[Slot], strides: Sequence[int], batch: int, branch: str) -> Group | None:
    """Elastic rows for given strides, or None when a GPU would be left without a band (the search tries
    the smaller set on its own, with strides relative to its own fastest GPU)."""
    banded = len(slots) > 1
    fixed, per_granule = _fixed(pb.cost, strides, batch, banded), pb.cost.affine(batch, banded)[1]
    multipliers = _multipliers(pb, slots, strides)
    units = elastic_units(multipliers, fixed, per_granule, pb.granules)
    if not all(units):
        return None
    return Group(tuple(slots), tuple(units), tuple(strides), branch, batch)


def _floored(pb: Problem, slots: Sequence[Slot], strides: Sequence[int], batch: int, branch: str) -> Group | None:
    """Rows for given strides when the elastic split would leave a GPU without a band but the GPU set is
    fixed (a re-plan keeps every running rank): one granule each, then every further granule to the rank
    whose window time grows least (water-filling on the affine cost, which minimises the slowest rank)."""
    if len(slots) > pb.granules:
        return None
    banded = len(slots) > 1
    fixed, per_granule = _fixed(pb.cost, strides, batch, banded), pb.cost.affine(batch, banded)[1]
    multipliers = _multipliers(pb, slots, strides)
    # With one granule held, a rank's time after u more is m * ((fixed + per_granule) + per_granule * u).
    extra = elastic_units(multipliers, [f + per_granule for f in fixed], per_granule, pb.granules - len(slots))
    return Group(tuple(slots), tuple(1 + u for u in extra), tuple(strides), branch, batch)


def single(pb: Problem, slots: Sequence[Slot]) -> list[Candidate]:
    """The whole image on the fastest GPU."""
    if len(slots) != 1:
        return []
    group = Group(tuple(slots), (pb.granules,), (1,), "both", pb.batch)
    return [Candidate("single", pb.steps * _times(pb, group)[0] / 1e3, (group,))]


def patch(pb: Problem, slots: Sequence[Slot]) -> list[Candidate]:
    """Equal bands, every step, stale activations after warmup (DistriFusion)."""
    if not 2 <= len(slots) <= pb.granules:
        return []
    group = Group(tuple(slots), tuple(equal_units(len(slots), pb.granules)), (1,) * len(slots), "both", pb.batch)
    return [Candidate("patch", _windowed_seconds(pb, *_times(pb, group), 1), (group,))]


def cfg(pb: Problem, slots: Sequence[Slot]) -> list[Candidate]:
    """Conditional and unconditional branch on one GPU each, predictions swapped every step (Hybridiff)."""
    if not pb.guidance or len(slots) != 2:
        return []
    groups = tuple(
        Group((s,), (pb.granules,), (1,), branch, 1) for s, branch in zip(slots, ("cond", "uncond"), strict=True)
    )
    step = max(_times(pb, g)[0] for g in groups) + pb.cost.latent_exchange_ms()
    return [Candidate("cfg", pb.steps * step / 1e3, groups)]


def cfg_stride_seconds(pb: Problem, cond_ms: float, uncond_ms: float, stride: int) -> float:
    """Strategy cfg-stride's latency: the cond rank's steps take ``cond_ms``, the uncond rank's ``uncond_ms``.

    Warmup (at least one step: the first window needs an unconditional prediction) and the lead of
    (T - W) mod k steps run as cfg. Then (T - W) // k windows of k steps: at each window start but the first
    (after the lead both ranks hold the latent) one collective swaps the cond rank's latent and the uncond
    rank's prediction; the cond rank then takes the k steps alone while the uncond rank evaluates its branch
    once on that latent, so a window costs max(k * c_cond, c_uncond + the latent's transfer) + a collective.
    The last window is the cond rank's k steps alone: nobody reads the uncond rank's prediction after it.
    """
    warm = max(1, min(pb.warmup, pb.steps))
    lead = warm + (pb.steps - warm) % stride
    windows = (pb.steps - warm) // stride
    cost = pb.cost
    split = lead * (max(cond_ms, uncond_ms) + cost.latent_exchange_ms())
    if windows == 0:
        return split / 1e3
    window = max(stride * cond_ms, uncond_ms + cost.latent_transfer_ms()) + COLLECTIVE_MS
    return (split + (windows - 1) * window + stride * cond_ms) / 1e3


def cfg_stride(pb: Problem, slots: Sequence[Slot]) -> list[Candidate]:
    """Branch strides on two GPUs: the faster runs the cond branch every step, the slower its uncond branch
    once per window of k steps (``cfg_stride_seconds``), k within the same caps as stadi's strides
    (maxStride, minEffectiveSteps on the uncond evaluations); the cond rank guides along the guidance direction
    of the last uncond prediction it received, k to 2k - 1 steps old."""
    if not pb.guidance or len(slots) != 2:
        return []
    fast, slow = slots
    cond = Group((fast,), (pb.granules,), (1,), "cond", 1)
    cond_ms = _times(pb, cond)[0]
    warm = min(pb.warmup, pb.steps)
    cap = stride_cap(slow.speed, fast.speed, pb.max_stride, pb.steps, warm, pb.min_effective_steps)
    out = []
    for k in range(1, cap + 1):
        uncond = Group((slow,), (pb.granules,), (k,), "uncond", 1)
        seconds = cfg_stride_seconds(pb, cond_ms, _times(pb, uncond)[0], k)
        out.append(Candidate("cfg-stride", seconds, (cond, uncond), k))
    return out


def cfg_stride_band_seconds(pb: Problem, fast: Slot, slow: Slot, shared: int, stride: int) -> float:
    """Strategy cfg-stride+band's latency: as cfg-stride, but the uncond branch is cut in two bands, ``shared``
    granules (the top rows) evaluated by the cond rank at each window start besides its k steps, the rest by the
    uncond rank, each band reading the other's context of the previous window (one bucketed exchange per window).

    Warmup and lead run as cfg. Of the (T - W) // k windows the first evaluates the bands synchronously (fresh
    context; both ranks' bands advance together layer by layer), the last none (nobody reads them), the others
    stale: a window costs max(k * c_cond + b_cond, b_uncond + the latent's transfer, max(b) + the exchange)
    and two collectives (the latent swap, the band exchange), b each band's step with its staging copies.
    """
    cost = pb.cost
    warm = max(1, min(pb.warmup, pb.steps))
    lead = warm + (pb.steps - warm) % stride
    windows = (pb.steps - warm) // stride
    cond_ms = cost.step_ms(cost.latent_height, 1, fast.speed)
    split = lead * (max(cond_ms, cost.step_ms(cost.latent_height, 1, slow.speed)) + cost.latent_exchange_ms())
    if windows == 0:
        return split / 1e3
    granularity = cost.profile.granularity
    rows = (shared * granularity, (pb.granules - shared) * granularity)

    def band(mine: int, other: int, speed: float, synchronous: bool) -> float:
        step = cost.step_ms(rows[mine], 1, speed, banded=True, synchronous=synchronous)
        if synchronous:
            return step + cost.exchange_ms(rows[other], 1)
        return step + cost.staging_ms(rows[mine], 1, speed) + cost.staging_ms(rows[other], 1, speed)

    def window(synchronous: bool) -> float:
        ours, theirs = band(0, 1, fast.speed, synchronous), band(1, 0, slow.speed, synchronous)
        if synchronous:  # the per-layer exchange runs both bands at the pace of the slower
            return max(ours, theirs) + stride * cond_ms + 2 * COLLECTIVE_MS
        exchange = max(ours, theirs) + cost.exchange_ms(max(rows), 1)
        return max(stride * cond_ms + ours, theirs + cost.latent_transfer_ms(), exchange) + 2 * COLLECTIVE_MS

    banded = window(True) + max(windows - 2, 0) * window(False) if windows > 1 else 0.0
    return (split + banded + stride * cond_ms) / 1e3


def cfg_stride_band(pb: Problem, slots: Sequence[Slot]) -> list[Candidate]:
    """Branch strides with the uncond branch shared: the faster GPU runs the cond branch every step and also a
    band of the uncond branch once per window of k steps, the slower GPU the rest of it
    (``cfg_stride_band_seconds``). Per k (within cfg-stride's caps, k = 1 included: each step guides along the
    direction of the step before it) the band that minimises the latency."""
    if not pb.guidance or len(slots) != 2 or pb.granules < 2:
        return []
    fast, slow = slots
    cond = Group((fast,), (pb.granules,), (1,), "cond", 1)
    warm = min(pb.warmup, pb.steps)
    cap = stride_cap(slow.speed, fast.speed, pb.max_stride, pb.steps, warm, pb.min_effective_steps)
    out = []
    for k in range(1, cap + 1):
        seconds, shared = min((cfg_stride_band_seconds(pb, fast, slow, a, k), a) for a in range(1, pb.granules))
        uncond = Group((slow,), (pb.granules - shared,), (k,), "uncond", 1)
        out.append(Candidate("cfg-stride+band", seconds, (cond, uncond), k, shared=shared))
    return out


def stadi(pb: Problem, slots: Sequence[Slot]) -> list[Candidate]:
    """Elastic bands and strided sub-grids: one candidate per stride vector, and equal bands at stride 1."""
    if not 2 <= len(slots) <= pb.granules:
        return []  # more ranks than granules: some would get no band, and a smaller set covers that
    fastest = slots[0].speed
    warm = min(pb.warmup, pb.steps)
    caps = [stride_cap(s.speed, fastest, pb.max_stride, pb.steps, warm, pb.min_effective_steps) for s in slots]
    groups = [_elastic(pb, slots, strides, pb.batch, "both") or _floored(pb, slots, strides, pb.batch, "both")
              for strides in stride_candidates(caps)]
    # Equal bands with stride 1 are in the search so that stadi can never predict worse than patch.
    groups.append(Group(tuple(slots), tuple(equal_units(len(slots), pb.granules)), (1,) * len(slots), "both",
                        pb.batch))
    out = []
    for group in groups:
        if group is not None:
            period = sync_period(group.strides)
            out.append(Candidate("stadi", _windowed_seconds(pb, *_times(pb, group), period), (group,), period))
    return out


def stadi_cfg(pb: Problem, slots: Sequence[Slot]) -> list[Candidate]:
    """Two groups of balanced aggregate speed, one per guidance branch, each with elastic bands."""
    if not pb.guidance or not 2 <= len(slots) <= 2 * pb.granules:
        return []
    members: tuple[list[Slot], list[Slot]] = ([], [])
    speed = [0.0, 0.0]
    for s in slots:  # fastest first, each to the group with less speed so far
        g = 0 if speed[0] <= speed[1] else 1
        members[g].append(s)
        speed[g] += s.speed
    groups = []
    for group_slots, branch in zip(members, ("cond", "uncond"), strict=True):
        group = _elastic(pb, group_slots, [1] * len(group_slots), 1, branch)
        if group is None:
            return []
        groups.append(group)
    times = [_times(pb, g) for g in groups]
    swap = pb.cost.latent_exchange_ms()
    seconds = _windowed_seconds(pb, max(t[0] for t in times) + swap, max(t[1] for t in times) + swap, 1)
    return [Candidate("stadi+cfg", seconds, tuple(groups))]


def hybrid(pb: Problem, slots: Sequence[Slot]) -> list[Candidate]:
    """Condition split as in cfg, and a pipeline window in which the two GPUs run the two stages of the
    denoiser, cut where their stage times balance."""
    if not pb.guidance or len(slots) != 2 or pb.hybrid is None:
        return []
    units = reference_units(pb.cost.profile.family, pb.cost.latent_height, pb.cost.latent_width)
    speeds = [s.speed for s in slots]
    cut = best_cut(pb.cost, units, speeds)
    stages = {cut.stage0: (0, cut.boundary), 1 - cut.stage0: (cut.boundary, cut.units)}
    groups = tuple(Group((s,), (pb.granules,), (1,), branch, 1, stages[i])
                   for i, (s, branch) in enumerate(zip(slots, ("cond", "uncond"), strict=True)))
    return [Candidate("hybrid", hybrid_seconds(pb.cost, pb.steps, pb.hybrid, units, speeds, cut), groups,
                      cut=cut)]


# Each strategy's candidates on one set of GPUs (none where it does not apply); the search keeps the best of
# each fidelity class (stadi.planner.fidelity).
STRATEGIES: dict[str, Callable[[Problem, Sequence[Slot]], list[Candidate]]] = {
    "single": single,
    "patch": patch,
    "cfg": cfg,
    "cfg-stride": cfg_stride,
    "cfg-stride+band": cfg_stride_band,
    "stadi": stadi,
    "stadi+cfg": stadi_cfg,
    "hybrid": hybrid,
}
