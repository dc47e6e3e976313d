"""Predicted latency of strategy ``hybrid`` (arXiv 2602.21760) on two GPUs, with the same affine cost model.

Condition split: each GPU runs one guidance branch over the full frame (batch 1) and the predictions are
swapped: a step costs the slower of the two plus the swap and rank 0's broadcast of its switch decision.
Pipeline window: each GPU runs a contiguous share of the denoiser's units over both branches (batch 2);
the stage-1 GPU works on the stage-0 output of the step before, so the two stages overlap: a step costs
the slower stage plus the hand-over of the hidden state (and UNet skips) and the swap of the guided
prediction. The first window step fills the hand-over and runs the stages one after the other.

How many window steps a run has is decided at run time by the discrepancy slope; the prediction assumes
the cap rule: the window starts at ``cap_step`` at the latest and lasts ``pipeline_steps`` (or up to the
last step), so the predicted count is ``min(k, T - cap)`` and never more than a run gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from stadi.families import HybridSchedule
from stadi.planner.cost import COLLECTIVE_MS, CostModel
from stadi.planner.stage_split import Unit, balanced_boundary, carry_bytes, share


@dataclass(frozen=True)
class StageCut:
    """Which of the two GPUs runs stage 0, and where the denoiser is cut."""

    stage0: int  # 0 or 1: index of the stage-0 GPU in the speeds given
    boundary: int  # stage 0 runs units [0, boundary), stage 1 the rest
    units: int
    name: str  # the first unit of stage 1


def window_steps(steps: int, schedule: HybridSchedule) -> int:
    """Pipeline steps the cap rule predicts."""
    return max(0, min(schedule.pipeline_steps, steps - schedule.cap_step))


def split_step_ms(cost: CostModel, speeds: Sequence[float]) -> float:
    """One condition-split step: the slower branch, the prediction swap, the decision broadcast."""
    full = cost.latent_height
    return max(cost.step_ms(full, 1, v) for v in speeds) + cost.latent_exchange_ms() + COLLECTIVE_MS


def window_step_ms(cost: CostModel, units: Sequence[Unit], speeds: Sequence[float], cut: StageCut
                   ) -> tuple[float, float]:
    """(first window step, every later window step) in ms."""
    both = cost.step_ms(cost.latent_height, 2, 1.0)
    f = share(units, cut.boundary)
    first = f * both / speeds[cut.stage0]
    second = (1.0 - f) * both / speeds[1 - cut.stage0]
    hand = COLLECTIVE_MS + 2 * carry_bytes(units, cut.boundary) / (cost.link_gbytes_per_s * 1e9) * 1e3
    swap = cost.latent_exchange_ms()
    return first + second + hand + swap, max(first, second) + hand + swap


def hybrid_seconds(cost: CostModel, steps: int, schedule: HybridSchedule, units: Sequence[Unit],
                   speeds: Sequence[float], cut: StageCut) -> float:
    """Predicted seconds of one image (its steps are never compiled: the split step and the stages run
    through the stage code, which the worker does not compile)."""
    cost = replace(cost, compiled=False)
    n = window_steps(steps, schedule)
    split = split_step_ms(cost, speeds)
    if n == 0:
        return steps * split / 1e3
    fill, pipe = window_step_ms(cost, units, speeds, cut)
    return ((steps - n) * split + fill + (n - 1) * pipe) / 1e3


def best_cut(cost: CostModel, units: Sequence[Unit], speeds: Sequence[float]) -> StageCut:
    """Either GPU as stage 0, each with its balanced boundary; the faster pipelined step wins (ties: the
    first GPU as stage 0)."""
    best: tuple[float, StageCut] | None = None
    for stage0 in (0, 1):
        b = balanced_boundary(units, speeds[stage0], speeds[1 - stage0])
        cut = StageCut(stage0, b, len(units), units[b].name)
        pipe = round(window_step_ms(cost, units, speeds, cut)[1], 9)
        if best is None or pipe < best[0]:
            best = (pipe, cut)
    assert best is not None
    return best[1]
