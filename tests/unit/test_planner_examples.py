"""Worked examples of the planner, with every figure derived by hand from DESIGN section 3.

SDXL at 1024^2 is a 128x128 latent, granularity 4 rows; CFG gives batch 2, so on an H100 (speed 1)
c(h) = 9 + 0.13 * 2 * h ms, plus 7.5 ms (SDXL's band_exchange_ms) on every step of a rank that shares the
rows with other ranks. The exchange costs 1.64 MB per row per batch item at the pool's link speed; every
synchronisation adds 0.05 ms.
"""

import math

import pytest

from stadi.planner import LINKS, Device, PlanRequest, plan

SDXL_1024 = PlanRequest("sdxl", 1024, 1024, steps=50)


BAND_EXCHANGE = 7.5  # SDXL's band_exchange_ms


def c_ms(rows: int, speed: float, batch: int = 2, banded: bool = True) -> float:
    return (9 + (BAND_EXCHANGE if banded else 0.0) + 0.13 * batch * rows) / speed


def exchange_ms(rows: int, link: float, batch: int = 2) -> float:
    return 1.64e6 * batch * rows / (link * 1e9) * 1e3


def test_h100_and_h100_at_half_load() -> None:
    """(H100, H100 at 50% load): stride 2 on the loaded GPU, equal bands, sync every 2 steps.

    The loaded GPU's ideal stride is 1/0.5 = 2 (4 + ceil(46/2) = 27 >= 20 effective steps). With P = 2 the
    fast rank runs 2 steps of 64 rows and the slow one 1 step of 64 rows at half speed: 66.28 ms each, band
    exchange included (the slow rank pays it once per window, the fast one twice). Warmup: 4 synchronous
    steps at the slow rank's 66.28 ms plus the exposed exchange of 64 rows over NVLink.
    """
    p = plan(SDXL_1024, [Device("H100"), Device("H100", load=0.5)])
    assert p.strategy == "stadi"
    assert [(r.gpu, r.rows, r.stride) for r in p.ranks] == [("H100", (0, 64), 1), ("H100", (64, 128), 2)]
    assert [r.speed for r in p.ranks] == [1.0, 0.5]
    assert p.sync_period == 2 and p.warmup_steps == 4
    window = max(2 * c_ms(64, 1.0), c_ms(64, 0.5)) + 0.05
    sync_step = c_ms(64, 0.5) + exchange_ms(64, LINKS["nvlink"]) + 0.05
    assert p.predicted_seconds == pytest.approx((4 * sync_step + 46 / 2 * window) / 1e3, abs=1e-6)
    assert p.predicted_seconds == pytest.approx(1.796508, abs=1e-6)
    assert [r.predicted_step_ms for r in p.ranks] == pytest.approx([c_ms(64, 1.0), c_ms(64, 0.5)], abs=1e-3)
    # Baselines: equal bands run at the slow rank's pace every step; one H100 runs 50 full steps.
    patch = (4 * sync_step + 46 * (c_ms(64, 0.5) + 0.05)) / 1e3
    assert p.alternatives["patch"] == pytest.approx(patch, abs=1e-6)
    assert p.alternatives["single"] == pytest.approx(50 * c_ms(128, 1.0, banded=False) / 1e3, abs=1e-6)
    assert p.alternatives["cfg"] == pytest.approx(
        50 * (c_ms(128, 0.5, batch=1, banded=False) + 0.05 + 16 * 2 * 128 * 128 / 150e9 * 1e3) / 1e3, abs=1e-6
    )
    assert p.predicted_seconds < p.alternatives["patch"]


def test_h100_and_l4_leaves_the_l4_out() -> None:
    """(H100, L4): the L4 (121 / 989.4 = 0.122 of an H100, PCIe link) does not pay at 50 steps.

    Its ideal stride is 8, capped at 3 by minEffectiveSteps (4 + ceil(46/3) = 20). With P = 3 the balanced
    split is 124 rows on the H100 (3 steps: 146.2 ms) and 4 on the L4 (1 step: 143.4 ms): the 7.5 ms band
    exchange the H100 pays on each of its steps is more than the L4 takes off it. With the 4 synchronous
    warmup steps at the L4's pace plus an exposed 20 ms exchange over PCIe: 2.898 s in all, more than the
    H100 alone (2.114 s). So the plan is `single` and the L4 is left out.
    """
    pool = [Device("H100"), Device("L4")]
    p = plan(SDXL_1024, pool)
    assert p.strategy == "single"
    assert [(r.gpu, r.rows, r.stride) for r in p.ranks] == [("H100", (0, 128), 1)]
    assert p.left_out == ["L4"]
    assert p.predicted_seconds == pytest.approx(50 * c_ms(128, 1.0, banded=False) / 1e3)

    forced = plan(PlanRequest("sdxl", 1024, 1024, steps=50, strategy="stadi"), pool)
    l4 = 121 / 989.4
    assert [(r.rows, r.stride) for r in forced.ranks] == [((0, 124), 1), ((124, 128), 3)]
    assert forced.sync_period == 3
    sync_step = c_ms(4, l4) + exchange_ms(124, LINKS["pcie"]) + 0.05
    window = max(3 * c_ms(124, 1.0), c_ms(4, l4), exchange_ms(124, LINKS["pcie"])) + 0.05
    expected = (4 * sync_step + 46 / 3 * window) / 1e3
    assert forced.predicted_seconds == pytest.approx(expected, rel=1e-4)
    assert forced.predicted_seconds == pytest.approx(2.898, abs=1e-3)
    assert forced.predicted_seconds > p.predicted_seconds
    assert 4 + math.ceil(46 / 3) >= 20


def test_longer_jobs_make_the_l40_pay() -> None:
    """An L40 (0.183 of an H100) is left out at 50 steps; with 200 the warmup is amortised and (H100, L40)
    beats the H100 alone."""
    short = plan(SDXL_1024, [Device("H100"), Device("L40")])
    assert short.strategy == "single" and short.left_out == ["L40"]
    p = plan(PlanRequest("sdxl", 1024, 1024, steps=200, min_effective_steps=50), [Device("H100"), Device("L40")])
    assert p.strategy == "stadi"
    assert p.predicted_seconds < p.alternatives["single"]
    assert p.ranks[1].gpu == "L40" and p.ranks[1].stride > 1


def test_the_l4_never_pays_its_band_exchange() -> None:
    """However long the job, the L4 (0.122) cannot pay for the 7.5 ms band exchange: to beat its 42.28 ms
    alone the H100 must shed at least 32 rows (7.5 / 0.26 ms per row, in granules of 4), and 32 rows at
    stride 4 take the L4 (9 + 7.5 + 8.32) / 0.122 = 203 ms per window, more than 4 steps of the H100 alone
    (169 ms)."""
    p = plan(PlanRequest("sdxl", 1024, 1024, steps=1000, min_effective_steps=250), [Device("H100"), Device("L4")])
    assert p.strategy == "single" and p.left_out == ["L4"]
    assert p.alternatives["stadi"] > p.alternatives["single"]
