"""Worked examples of the planner, with every figure derived by hand from DESIGN section 3.

SDXL at 1024^2 is a 128x128 latent, granularity 4 rows; CFG gives batch 2, so on an H100 (speed 1)
c(h) = 9 + 0.13 * 2 * h ms. The exchange costs 1.64 MB per row per batch item at the pool's link speed;
every synchronisation adds 0.05 ms.
"""

import math

import pytest

from stadi.planner import LINKS, Device, PlanRequest, plan

SDXL_1024 = PlanRequest("sdxl", 1024, 1024, steps=50)


def c_ms(rows: int, speed: float, batch: int = 2) -> float:
    return (9 + 0.13 * batch * rows) / speed


def exchange_ms(rows: int, link: float, batch: int = 2) -> float:
    return 1.64e6 * batch * rows / (link * 1e9) * 1e3


def test_h100_and_h100_at_half_load() -> None:
    """(H100, H100 at 50% load): stride 2 on the loaded GPU, equal bands, sync every 2 steps.

    The loaded GPU's ideal stride is 1/0.5 = 2 (4 + ceil(46/2) = 27 >= 20 effective steps). With P = 2 the
    fast rank runs 2 steps of 64 rows and the slow one 1 step of 64 rows at half speed: 51.28 ms each.
    Warmup: 4 synchronous steps at the slow rank's 51.28 ms plus the exposed exchange of 64 rows over NVLink.
    """
    p = plan(SDXL_1024, [Device("H100"), Device("H100", load=0.5)])
    assert p.strategy == "stadi"
    assert [(r.gpu, r.rows, r.stride) for r in p.ranks] == [("H100", (0, 64), 1), ("H100", (64, 128), 2)]
    assert [r.speed for r in p.ranks] == [1.0, 0.5]
    assert p.sync_period == 2 and p.warmup_steps == 4
    window = max(2 * c_ms(64, 1.0), c_ms(64, 0.5)) + 0.05
    sync_step = c_ms(64, 0.5) + exchange_ms(64, LINKS["nvlink"]) + 0.05
    assert p.predicted_seconds == pytest.approx((4 * sync_step + 46 / 2 * window) / 1e3, abs=1e-6)
    assert p.predicted_seconds == pytest.approx(1.391508, abs=1e-6)
    # Baselines: equal bands run at the slow rank's pace every step; one H100 runs 50 full steps.
    patch = (4 * sync_step + 46 * (c_ms(64, 0.5) + 0.05)) / 1e3
    assert p.alternatives["patch"] == pytest.approx(patch, abs=1e-6)
    assert p.alternatives["single"] == pytest.approx(50 * c_ms(128, 1.0) / 1e3, abs=1e-6)
    assert p.alternatives["cfg"] == pytest.approx(
        50 * (c_ms(128, 0.5, batch=1) + 0.05 + 16 * 2 * 128 * 128 / 150e9 * 1e3) / 1e3, abs=1e-6
    )
    assert p.predicted_seconds < p.alternatives["patch"]


def test_h100_and_l4_leaves_the_l4_out() -> None:
    """(H100, L4): the L4 (121 / 989.4 = 0.122 of an H100, PCIe link) does not pay at 50 steps.

    Its ideal stride is 8, capped at 3 by minEffectiveSteps (4 + ceil(46/3) = 20). With P = 3 the balanced
    split is 112 rows on the H100 (3 steps: 114.36 ms) and 16 on the L4 (1 step: 107.6 ms), but the 4
    synchronous warmup steps run at the L4's pace plus an exposed 18 ms exchange over PCIe: 2.258 s in all,
    more than the H100 alone (2.114 s). So the plan is `single` and the L4 is left out.
    """
    pool = [Device("H100"), Device("L4")]
    p = plan(SDXL_1024, pool)
    assert p.strategy == "single"
    assert [(r.gpu, r.rows, r.stride) for r in p.ranks] == [("H100", (0, 128), 1)]
    assert p.left_out == ["L4"]
    assert p.predicted_seconds == pytest.approx(50 * c_ms(128, 1.0) / 1e3)

    forced = plan(PlanRequest("sdxl", 1024, 1024, steps=50, strategy="stadi"), pool)
    l4 = 121 / 989.4
    assert [(r.rows, r.stride) for r in forced.ranks] == [((0, 112), 1), ((112, 128), 3)]
    assert forced.sync_period == 3
    sync_step = c_ms(16, l4) + exchange_ms(112, LINKS["pcie"]) + 0.05
    window = max(3 * c_ms(112, 1.0), c_ms(16, l4), exchange_ms(112, LINKS["pcie"])) + 0.05
    expected = (4 * sync_step + 46 / 3 * window) / 1e3
    assert forced.predicted_seconds == pytest.approx(expected, rel=1e-4)
    assert forced.predicted_seconds > p.predicted_seconds
    assert 4 + math.ceil(46 / 3) >= 20


def test_longer_jobs_make_the_l4_pay() -> None:
    """With 200 steps the warmup is amortised: (H100, L4) now beats the H100 alone."""
    p = plan(PlanRequest("sdxl", 1024, 1024, steps=200, min_effective_steps=50), [Device("H100"), Device("L4")])
    assert p.strategy == "stadi"
    assert p.predicted_seconds < p.alternatives["single"]
    assert p.ranks[1].gpu == "L4" and p.ranks[1].stride > 1
