"""Which GPUs to use and which strategy: the minimum predicted latency over subsets of the pool."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from stadi.api import BRANCH_STRIDES, FIDELITIES, GUIDANCE_SPLITS, HybridPlan, Plan, RankPlan
from stadi.planner.fidelity import ADMITS, DEFAULT_QUALITY, classify
from stadi.planner.strategies import STRATEGIES, Assignment, Candidate, Problem, Slot

# Up to this many distinct sub-multisets of the pool (7 GPUs of distinct speeds) are searched exhaustively,
# so that adding a GPU can never raise the predicted latency; larger pools by prefixes of the speed order.
EXHAUSTIVE_SUBSETS = 128


@dataclass(frozen=True)
class Limits:
    """What the job allows: strategy, GPU count, and the fidelity classes auto may pick (``quality``)."""

    strategy: str = "auto"
    gpus_min: int = 1
    gpus_max: int = 8
    quality: str = DEFAULT_QUALITY
    among: tuple[str, ...] | None = None  # the strategies auto may choose; None: every one

    @property
    def admitted(self) -> tuple[str, ...]:
        """The fidelity classes that may be chosen: the quality's under auto; a named strategy runs as asked."""
        return ADMITS[self.quality] if self.strategy == "auto" else FIDELITIES


def subsets(slots: Sequence[Slot], low: int, high: int) -> Iterator[tuple[Slot, ...]]:
    """Candidate GPU sets, each ordered fastest first.

    GPUs of equal speed are interchangeable, so a set is a count per speed class. When the classes allow
    few such sets, all are tried; otherwise the k fastest for every k.
    """
    classes: dict[float, list[Slot]] = {}
    for s in slots:
        classes.setdefault(s.speed, []).append(s)
    groups = list(classes.values())  # slots arrive fastest first, so groups are too
    if math.prod(len(g) + 1 for g in groups) <= EXHAUSTIVE_SUBSETS:
        for counts in itertools.product(*(range(len(g) + 1) for g in groups)):
            if low <= sum(counts) <= high:
                yield tuple(s for g, c in zip(groups, counts, strict=True) for s in g[:c])
    else:
        for k in range(max(low, 1), min(high, len(slots)) + 1):
            yield tuple(slots[:k])


def fidelity(pb: Problem, cand: Candidate) -> str:
    """The candidate's fidelity class (``stadi.planner.fidelity.classify``)."""
    strides = [k for g in cand.groups for k in g.strides]
    return classify(pb.cost.profile.family, cand.strategy, strides, any(g.banded for g in cand.groups),
                    min(pb.warmup, pb.steps) >= pb.steps)


def search(pb: Problem, slots: Sequence[Slot], limits: Limits) -> tuple[Candidate, dict[str, Candidate]]:
    """The chosen candidate and every applicable strategy's: its best admitted one, or its fastest when it
    has none (shown, never chosen by auto).

    Each strategy keeps its best candidate per fidelity class, since a slower arrangement of it (smaller
    strides) may be within the bound where its fastest is not. Ties between strategies go to the more exact
    class.
    """
    best: dict[tuple[str, str], Candidate] = {}
    high = min(limits.gpus_max, len(slots))
    for subset in subsets(slots, limits.gpus_min, high):
        on_subset = pb.on(subset)
        for name, strategy in STRATEGIES.items():
            for cand in strategy(on_subset, subset):
                key = (name, fidelity(pb, cand))
                if key not in best or cand.order() < best[key].order():
                    best[key] = cand
    admitted = limits.admitted

    def rank(key: tuple[str, str]) -> tuple[bool, tuple[float, int, int, int], int]:
        return key[1] not in admitted, best[key].order(), FIDELITIES.index(key[1])

    shown = {name: best[min((k for k in best if k[0] == name), key=rank)] for name, _ in best}
    if limits.strategy == "auto":
        choices = [k for k in best if k[1] in admitted and (limits.among is None or k[0] in limits.among)]
        if not best:
            raise ValueError("no strategy fits this pool and job")
        if not choices:
            raise ValueError(f"no plan of fidelity {' or '.join(admitted)} (parallelism.quality "
                             f"{limits.quality!r}) fits this pool and job; the strategies that fit are "
                             f"{', '.join(f'{n} ({f})' for n, f in sorted(best))}")
        chosen = best[min(choices, key=rank)]
    elif limits.strategy in shown:
        chosen = shown[limits.strategy]
    else:
        raise ValueError(_why_not(limits.strategy, pb, len(slots), limits))
    return chosen, shown


def _why_not(strategy: str, pb: Problem, usable: int, limits: Limits) -> str:
    if strategy in GUIDANCE_SPLITS and not pb.guidance:
        return f"strategy {strategy!r} splits the guidance branches and needs guidanceScale > 1"
    if strategy == "hybrid" and pb.hybrid is None:
        return f"strategy 'hybrid' has no stage split for model family {pb.cost.profile.family!r}"
    if strategy == "single":
        return f"strategy 'single' uses one GPU but parallelism.gpus.min is {limits.gpus_min}"
    if strategy == "cfg-stride+band" and pb.granules < 2:
        return (f"strategy 'cfg-stride+band' cuts the image in two bands of {pb.cost.profile.granularity} latent "
                f"rows at least; the image has {pb.granules}")
    if strategy in ("cfg", "hybrid", *BRANCH_STRIDES):
        return f"strategy {strategy!r} needs exactly 2 GPUs within parallelism.gpus; the pool allows {usable}"
    bands = pb.granules * (2 if strategy == "stadi+cfg" else 1)
    if limits.gpus_min > bands:
        return (f"parallelism.gpus.min is {limits.gpus_min} but the image has only {bands} bands of "
                f"{pb.cost.profile.granularity} latent rows for strategy {strategy!r}")
    return f"strategy {strategy!r} needs at least 2 GPUs within parallelism.gpus; the pool has {usable} usable"


def launch_order(ranks: Sequence[Assignment]) -> list[Assignment]:
    """Ranks renumbered for launch: the GPUs of one node get consecutive ranks (torchrun numbers a node's
    processes together), and within each guidance branch the bands are laid out in rank order.

    A band's cost depends on its height only, so moving it keeps the prediction; keeping row order equal
    to rank order within a branch lets the worker find its neighbours without a lookup.
    """
    first_seen: dict[str | None, int] = {}
    for a in ranks:  # fastest first, so the node of the fastest GPU comes first
        first_seen.setdefault(a.slot.node, len(first_seen))
    ordered = sorted(
        ranks, key=lambda a: (first_seen[a.slot.node], a.branch != "cond", a.branch, -a.slot.speed)
    )
    cursor: dict[str, int] = {}
    out = []
    for a in ordered:
        start = cursor.get(a.branch, 0)
        end = start + a.rows[1] - a.rows[0]
        cursor[a.branch] = end
        out.append(replace(a, rows=(start, end)))
    return out


def to_plan(pb: Problem, chosen: Candidate, best: dict[str, Candidate], slots: Sequence[Slot]) -> Plan:
    """The pydantic Plan of a candidate, with every strategy's prediction and fidelity class and the GPUs
    left out."""
    ranks = launch_order(chosen.ranks(pb.cost))
    used = {id(a.slot) for a in ranks}
    plan = Plan(
        strategy=chosen.strategy,  # type: ignore[arg-type]
        family=pb.cost.profile.family,
        latent_height=pb.cost.latent_height,
        latent_width=pb.cost.latent_width,
        granularity=pb.cost.profile.granularity,
        steps=pb.steps,
        guidance=pb.guidance,
        ranks=[
            RankPlan(
                rank=i,
                gpu=a.slot.label,
                node=a.slot.node,
                gpu_index=a.slot.index,
                speed=round(a.slot.speed, 6),
                rows=a.rows,
                stride=a.stride,
                branch=a.branch,  # type: ignore[arg-type]
                layers=a.layers,
                predicted_step_ms=round(a.step_ms, 3),
            )
            for i, a in enumerate(ranks)
        ],
        sync_period=chosen.sync_period,
        warmup_steps=min(pb.warmup, pb.steps) if len(ranks) > 1 else 0,
        predicted_seconds=round(chosen.seconds, 6),
        alternatives={name: round(c.seconds, 6) for name, c in best.items()},
        fidelity=fidelity(pb, chosen),  # type: ignore[arg-type]
        alternative_fidelity={name: fidelity(pb, c) for name, c in best.items()},  # type: ignore[misc]
        left_out=[_describe(s) for s in slots if id(s) not in used],
        hybrid=_hybrid_plan(pb, chosen),
    )
    return _shared(plan, chosen.shared * pb.cost.profile.granularity) if chosen.shared else plan


def _shared(plan: Plan, rows: int) -> Plan:
    """A cfg-stride+band plan: the top ``rows`` of the uncond branch on the cond rank, the rest on the uncond
    rank."""
    ranks = [r.model_copy(update={"uncond_rows": (0, rows)} if r.branch == "cond" else
                          {"rows": (rows, plan.latent_height)}) for r in plan.ranks]
    return plan.model_copy(update={"ranks": ranks})


def _hybrid_plan(pb: Problem, chosen: Candidate) -> HybridPlan | None:
    if chosen.cut is None or pb.hybrid is None:
        return None
    s = pb.hybrid
    return HybridPlan(window=s.window, slope_threshold=s.slope_threshold, pipeline_steps=s.pipeline_steps,
                      cap_step=s.cap_step, units=chosen.cut.units, boundary_layer=chosen.cut.name)


def _describe(slot: Slot) -> str:
    where = f"{slot.node}/" if slot.node else ""
    index = f"#{slot.index}" if slot.index is not None else ""
    return f"{where}{slot.label}{index}"
