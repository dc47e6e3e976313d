"""Plans with idle ranks (a re-plan after warmup left a process's GPU out): validation and the prediction."""

from __future__ import annotations

from typing import Any

import pytest

from stadi.api import Plan
from stadi.planner import LINKS
from stadi.planner.evaluate import predict_seconds


def _doc(ranks: list[dict[str, Any]], strategy: str = "stadi", sync_period: int = 1) -> dict[str, Any]:
    return {"strategy": strategy, "family": "sdxl", "latent_height": 16, "latent_width": 16, "granularity": 4,
            "steps": 8, "guidance": True, "warmup_steps": 2, "predicted_seconds": 1.0, "sync_period": sync_period,
            "ranks": [{"rank": i, "gpu": "H100", "speed": 1.0, **r} for i, r in enumerate(ranks)]}


IDLE = {"rows": [0, 0], "idle": True}


@pytest.mark.parametrize("ranks", [
    [{"rows": [0, 16]}, IDLE],
    [IDLE, {"rows": [0, 16]}],
    [{"rows": [0, 8], "stride": 2}, IDLE, {"rows": [8, 16], "stride": 2}],
])
def test_idle_ranks_are_accepted(ranks: list[dict[str, Any]]) -> None:
    plan = Plan.model_validate(_doc(ranks, sync_period=max(r.get("stride", 1) for r in ranks)))
    plan.validate_for(len(ranks))
    assert plan.world_size == len(ranks)  # processes, idle ones included
    assert [r.rank for r in plan.active] == [i for i, r in enumerate(ranks) if not r.get("idle")]


def test_single_with_an_idle_rank_is_accepted() -> None:
    Plan.model_validate(_doc([{"rows": [0, 16]}, IDLE], strategy="single")).validate_for(2)


def test_condition_split_beside_an_idle_rank_is_accepted() -> None:
    plan = Plan.model_validate(_doc([{"rows": [0, 16], "branch": "cond"}, IDLE,
                                     {"rows": [0, 16], "branch": "uncond"}], strategy="cfg"))
    plan.validate_for(3)


@pytest.mark.parametrize(("ranks", "world", "message"), [
    # active bands must still tile the latent exactly once, idle ranks or not
    ([{"rows": [0, 8]}, IDLE], 2, r"do not tile \[0, 16\)|end at row 8"),
    ([{"rows": [0, 12]}, IDLE, {"rows": [8, 16]}], 3, r"do not tile \[0, 16\) exactly once"),
    ([{"rows": [0, 6]}, IDLE, {"rows": [6, 16]}], 3, "not a multiple of the granularity 4"),
    # an idle rank holds no rows, and an active one cannot hide as one of zero height
    ([{"rows": [0, 16]}, {"rows": [0, 4], "idle": True}], 2, r"idle rank 1 must have rows \[0, 0\)"),
    ([{"rows": [0, 16]}, {"rows": [0, 0]}], 2, "do not tile"),
    ([IDLE, IDLE], 2, "every rank of the plan is idle"),
    # the world counts idle processes too
    ([{"rows": [0, 16]}, IDLE], 1, "plan has 2 ranks but the world size is 1"),
])
def test_bad_plans_with_idle_ranks_are_rejected(ranks: list[dict[str, Any]], world: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Plan.model_validate(_doc(ranks)).validate_for(world)


def test_sync_period_counts_active_strides_only() -> None:
    bad = _doc([{"rows": [0, 8], "stride": 2}, {"rows": [8, 16], "stride": 3}, IDLE], sync_period=2)
    with pytest.raises(ValueError, match=r"sync_period 2 is not the lcm of the active ranks' strides \[2, 3\] \(6\)"):
        Plan.model_validate(bad).validate_for(3)
    Plan.model_validate(_doc([{"rows": [0, 16], "stride": 2}, {**IDLE, "stride": 3}], sync_period=2)).validate_for(2)


def test_hybrid_plans_have_no_idle_rank() -> None:
    doc = _doc([{"rows": [0, 16], "branch": "cond", "layers": [0, 5]}, IDLE,
                {"rows": [0, 16], "branch": "uncond", "layers": [5, 10]}], strategy="hybrid")
    doc["hybrid"] = {"window": 12, "slope_threshold": 4e-4, "pipeline_steps": 5, "cap_step": 15, "units": 10,
                     "boundary_layer": "x"}
    with pytest.raises(ValueError, match="2 ranks, none idle"):
        Plan.model_validate(doc).validate_for(3)


def test_an_idle_rank_costs_nothing_in_the_prediction() -> None:
    alone = Plan.model_validate(_doc([{"rows": [0, 16]}], strategy="single"))
    beside = Plan.model_validate(_doc([{"rows": [0, 16]}, IDLE], strategy="single"))
    args = (2, 4, 1, LINKS["pcie"])
    assert predict_seconds(beside, [1.0, 0.01], *args) == predict_seconds(alone, [1.0], *args)


def test_idle_round_trips_and_defaults_to_active() -> None:
    plan = Plan.model_validate(_doc([{"rows": [0, 16]}, IDLE], strategy="single"))
    assert Plan.model_validate_json(plan.model_dump_json()) == plan
    assert not Plan.model_validate(_doc([{"rows": [0, 16]}], strategy="single")).ranks[0].idle
