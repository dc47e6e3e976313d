"""A plan's sync period is the lcm of its active ranks' strides: what the planner priced is what the worker
runs (it takes ``Plan.sync_period`` as given), so a plan that says otherwise is refused."""

from __future__ import annotations

from typing import Any

import pytest

from stadi.api import Plan
from stadi.planner import Device, PlanRequest, plan


def _doc(strides: list[int], sync_period: int, idle: bool = False) -> dict[str, Any]:
    ranks = [{"rank": i, "gpu": "H100", "speed": 1.0, "rows": [4 * i, 4 * i + 4], "stride": k}
             for i, k in enumerate(strides)]
    if idle:
        ranks.append({"rank": len(ranks), "gpu": "H100", "speed": 1.0, "rows": [0, 0], "idle": True, "stride": 5})
    return {"strategy": "stadi", "family": "sdxl", "latent_height": 4 * len(strides), "latent_width": 16,
            "granularity": 4, "steps": 20, "guidance": True, "warmup_steps": 2, "predicted_seconds": 1.0,
            "sync_period": sync_period, "ranks": ranks}


@pytest.mark.parametrize(("strides", "period"), [([1, 2], 2), ([2, 3], 6), ([1, 1], 1), ([2, 4, 1], 4)])
def test_the_lcm_is_accepted(strides: list[int], period: int) -> None:
    p = Plan.model_validate(_doc(strides, period))
    p.validate_for(len(strides))


@pytest.mark.parametrize(("strides", "period"), [([1, 2], 4), ([2, 3], 12), ([1, 1], 2), ([1, 2], 1)])
def test_any_other_period_is_refused(strides: list[int], period: int) -> None:
    p = Plan.model_validate(_doc(strides, period))
    with pytest.raises(ValueError, match=rf"sync_period {period} is not the lcm of the active ranks' strides"):
        p.validate_for(len(strides))


def test_an_idle_rank_does_not_count() -> None:
    Plan.model_validate(_doc([1, 2], 2, idle=True)).validate_for(3)


def test_the_planner_writes_the_lcm() -> None:
    pool = [Device("H100"), Device("H100", load=0.5), Device("L4")]
    for strategy in ("stadi", "patch", "auto"):
        p = plan(PlanRequest("sdxl", 1024, 1024, strategy=strategy), pool)
        p.validate_for()
