"""Flux's shared text stream in the planner (docs/architecture.md, "The planner"): one band of a group computes the
512 text tokens, the others read their keys and values; the plan, the cost model and the elastic split agree on
which band that is."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stadi.api import Plan
from stadi.families import profile, text_bands
from stadi.planner import Device, PlanRequest, plan
from stadi.planner.cost import CostModel
from stadi.planner.patches import elastic_units


def _plan(family: str, rows: list[tuple[int, int]], strides: list[int], idle: tuple[int, ...] = ()) -> Plan:
    return Plan.model_validate({
        "strategy": "stadi", "family": family, "latent_height": 128, "latent_width": 128, "granularity": 2,
        "steps": 28, "guidance": False, "predicted_seconds": 1.0,
        "ranks": [{"rank": i, "gpu": "H200", "speed": 1.0, "rows": list((0, 0) if i in idle else r), "stride": k,
                   "idle": i in idle}
                  for i, (r, k) in enumerate(zip(rows, strides, strict=True))],
    })


def test_the_text_band_is_the_first_of_the_smallest_stride() -> None:
    assert text_bands("flux", [1, 1]) == [True, False]
    assert text_bands("flux", [2, 1, 1]) == [False, True, False]
    assert text_bands("flux", [3, 2]) == [False, True]


def test_one_rank_of_a_flux_group_computes_the_text() -> None:
    # ranks listed out of band order: rank 0 holds the bottom band at stride 2, rank 2 the middle one at stride 1
    p = _plan("flux", [(64, 128), (0, 32), (32, 64)], [2, 1, 1])
    assert [p.computes_text(r) for r in range(3)] == [False, True, False]
    # an idle rank computes nothing; one active rank alone computes its text
    alone = _plan("flux", [(0, 128), (0, 0)], [1, 1], idle=(1,))
    assert [alone.computes_text(r) for r in range(2)] == [True, False]
    # SD3 computes its text with every band
    assert all(_plan("sd3", [(0, 64), (64, 128)], [1, 2]).computes_text(r) for r in range(2))


def test_the_cost_of_a_band_without_the_text() -> None:
    """A Flux band that does not compute the text costs text_ms less (compiled: its share), SD3's the same."""
    flux = CostModel(profile("flux"), 128, 128, 150.0, compiled=True)
    with_text = flux.compute_ms(64, 1, 1.0, banded=True)
    without = flux.compute_ms(64, 1, 1.0, banded=True, text=False)
    assert with_text - without == pytest.approx(19.6 * 0.86)
    assert flux.compute_ms(128, 1, 1.0) == flux.compute_ms(128, 1, 1.0, text=False)  # whole frame: always
    assert flux.texts([2, 1]) == [False, True] and flux.texts([1]) == [True]
    assert flux.text_rows() == pytest.approx(19.6 / 1.226)  # the 512 tokens weigh 16 latent rows of 32 tokens
    sd3 = CostModel(profile("sd3"), 128, 128, 150.0)
    assert sd3.texts([1, 1]) == [True, True] and sd3.text_rows() == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.5, 4.0), st.floats(0.0, 30.0)), min_size=2, max_size=3),
       st.floats(0.5, 5.0), st.integers(2, 14))
def test_elastic_units_with_a_fixed_cost_per_rank_minimise_the_slowest(ranks: list[tuple[float, float]],
                                                                        per_unit: float, total: int) -> None:
    """Against every split of ``total`` granules (a rank with none costs nothing): the slowest rank's time is the
    least there is."""
    m, f = [r[0] for r in ranks], [r[1] for r in ranks]

    def slowest(units: tuple[int, ...] | list[int]) -> float:
        return max((mi * (fi + per_unit * u) if u else 0.0) for mi, fi, u in zip(m, f, units, strict=True))

    units = elastic_units(m, f, per_unit, total)
    assert sum(units) == total and min(units) >= 0
    best = min(slowest(c) for c in itertools.product(range(total + 1), repeat=len(m)) if sum(c) == total)
    assert slowest(units) == pytest.approx(best, rel=1e-9)


def test_a_flux_pair_gives_the_text_band_fewer_rows() -> None:
    """Two equal H200s (compiled, 1024², 28 steps): the band that computes the text gets 56 of 128 rows, the
    other 72, so that 19.6 ms of text (16.9 compiled) balances 16 rows; both steps take (0.7 + 11.0 + 1.226 · 72)
    · 0.86 = 86.0 ms. Before the text was shared every band paid it: equal bands, (20.3 + 11.0 + 1.226 · 64) · 0.86
    = 94.4 ms."""
    request = PlanRequest(family="flux", height=1024, width=1024, steps=28, guidance=False,
                          compiled=True, strategy="stadi")
    p = plan(request, [Device("H200", index=0), Device("H200", index=1)])
    assert [r.rows for r in p.ranks] == [(0, 56), (56, 128)]
    assert [p.computes_text(r.rank) for r in p.ranks] == [True, False]
    assert [round(r.predicted_step_ms, 1) for r in p.ranks] == [86.0, 86.0]


def test_a_flux_pair_at_half_speed_beats_one_gpu_by_more() -> None:
    """H200 beside one at 50% (compiled, 28 steps, default quality rule): the fast rank takes the text and 84 rows
    ((20.3 + 11.0 + 1.226 · 84) · 0.86 = 115.5 ms), the slow one 44 rows ((0.7 + 11.0 + 1.226 · 44) · 0.86 / 0.5 =
    112.9 ms). With every band paying the text it was 94 / 34 rows and 3.81 s, 1.02x one GPU (3.87 s)."""
    request = PlanRequest(family="flux", height=1024, width=1024, steps=28, guidance=False,
                          compiled=True)
    p = plan(request, [Device("H200", index=0), Device("H200", index=1, load=0.5)])
    assert p.strategy == "stadi" and [r.rows for r in p.ranks] == [(0, 84), (84, 128)]
    assert [round(r.predicted_step_ms, 1) for r in p.ranks] == [115.5, 112.9]
    assert p.alternatives["single"] / p.predicted_seconds > 1.1
