"""Strategy cfg-stride+band in the planner: the faster GPU of a pair also evaluates a band of the slower one's
uncond branch once per window (``strategies.cfg_stride_band``), priced against cfg-stride with the same k."""

from __future__ import annotations

import pytest

from stadi.api import Plan
from stadi.cli import format_plan
from stadi.families import profile
from stadi.planner import LINKS, Device, PlanRequest, plan
from stadi.planner.cost import CostModel
from stadi.planner.evaluate import predict_seconds
from stadi.planner.strategies import Problem, Slot, cfg_stride, cfg_stride_band, cfg_stride_band_seconds


def problem(family: str = "sd3", compiled: bool = True) -> Problem:
    """1024^2 (128 latent rows), 50 steps, 4 warmup, the defaults' stride caps, NVLink."""
    return Problem(CostModel(profile(family), 128, 128, LINKS["nvlink"], compiled), 50, 4, True, 4, 20)


def by_k(candidates: list) -> dict[int, float]:
    return {c.sync_period: c.seconds for c in candidates}


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_a_band_pays_where_the_slower_branch_sets_the_pace(family: str) -> None:
    """At 25% the slower GPU's whole uncond branch per window is longer than the faster one's k steps at k = 2 (and
    for SD3 at 3): moving rows of it to the faster GPU shortens the window; SDXL's band at k = 3 costs its fixed
    cost and context more than it saves. At 50% with k = 2 the two are balanced already and the band's own step
    (its fixed cost) makes the window longer."""
    pb = problem(family)
    fast = Slot("H200", 1.0)
    quarter = [fast, Slot("H200", 0.25)]
    stride, band = by_k(cfg_stride(pb, quarter)), by_k(cfg_stride_band(pb, quarter))
    assert band[2] < stride[2] and (band[3] < stride[3]) == (family == "sd3")
    half = [fast, Slot("H200", 0.5)]
    assert by_k(cfg_stride_band(pb, half))[2] > by_k(cfg_stride(pb, half))[2]


def test_the_band_balances_the_window() -> None:
    """The chosen band is the best of every cut, and the cuts around it are worse on both sides: fewer rows on the
    faster GPU leave the slower one the pace, more make the faster one the pace."""
    pb = problem()
    fast, slow = Slot("H200", 1.0), Slot("H200", 0.25)
    for cand in cfg_stride_band(pb, [fast, slow]):
        k, shared = cand.sync_period, cand.shared
        seconds = {a: cfg_stride_band_seconds(pb, fast, slow, a, k) for a in range(1, pb.granules)}
        assert cand.seconds == min(seconds.values()) == seconds[shared]
        assert 1 < shared < pb.granules - 1
        assert seconds[shared - 1] > cand.seconds and seconds[shared + 1] > cand.seconds


def test_the_plan_puts_the_band_on_the_cond_rank_and_prices_it_again() -> None:
    """The Plan of the strategy: the cond rank holds the whole frame and the uncond branch's top rows, the uncond
    rank the rest; the re-plan's evaluation of it at the same speeds gives the search's latency, and the table of
    `stadi plan` names the band."""
    req = PlanRequest("sd3", 1024, 1024, steps=50, compiled=True, strategy="cfg-stride+band")
    p = plan(req, [Device("H200", 0.0, index=0), Device("H200", 0.75, index=1)])
    Plan.model_validate(p.model_dump()).validate_for(2)
    cond, uncond = p.ranks
    assert (cond.branch, cond.rows, uncond.branch) == ("cond", (0, 128), "uncond")
    assert cond.uncond_rows is not None and cond.uncond_rows[0] == 0 and uncond.rows == (cond.uncond_rows[1], 128)
    assert uncond.stride == p.sync_period > 1
    again = predict_seconds(p, [r.speed for r in p.ranks], req.warmup_steps, req.max_stride,
                            req.min_effective_steps, LINKS["nvlink"], compiled=True)
    assert again == pytest.approx(p.predicted_seconds, rel=1e-5)
    assert f"rank 0 also evaluates the uncond branch's rows [0, {cond.uncond_rows[1]}) once per window" in (
        format_plan(p))


def test_one_granule_cannot_be_cut() -> None:
    """An image of one band granule has no band to share: the strategy does not apply, and asking for it says why."""
    pb = Problem(CostModel(profile("sd3"), 2, 128, LINKS["nvlink"]), 50, 4, True, 4, 20)
    assert cfg_stride_band(pb, [Slot("H200", 1.0), Slot("H200", 0.5)]) == []
    with pytest.raises(ValueError, match="two bands of 2 latent rows at least; the image has 1"):
        plan(PlanRequest("sd3", 16, 1024, steps=50, strategy="cfg-stride+band"),
             [Device("H200", 0.0, index=0), Device("H200", 0.5, index=1)])
