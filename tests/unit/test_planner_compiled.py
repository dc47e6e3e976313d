"""spec.model.compile in the planner: compiled whole-frame steps cost COMPILED_WHOLE_FRAME of a graph's, banded
steps the family's compiled_band (the bucketed engine compiles them; the per-layer one measured on 2x H200 did
not), hybrid steps do not change, and the choice follows what was measured on 2x H200 with the per-layer engine
(SD3 at 50% SMs: uncompiled, stadi beats the cfg split; compiled, the cfg split wins)."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from stadi_worker.engine.replan import step_cost_at_unit_speed

from stadi.api import DiffusionJobSpec
from stadi.families import HYBRID_DEFAULTS, SD3_BAND_COMPILE_MS, profile
from stadi.planner import Device, PlanRequest, plan
from stadi.planner.cost import COMPILED_WHOLE_FRAME, CostModel
from stadi.planner.hybrid import StageCut, hybrid_seconds
from stadi.planner.stage_split import reference_units

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def _spec(compiled: bool) -> DiffusionJobSpec:
    return DiffusionJobSpec.model_validate({
        "model": {"family": "sd3", "source": "random://full", "compile": compiled}, "prompts": ["x"],
        "output": {"uri": "file:///tmp/x"}})


def _band_ratios(name: str, rows: tuple[int, ...] | None = None) -> list[float]:
    bands = json.loads((RESULTS / name).read_text())["bands"]
    return [b["compiled_ms"]["local"] / b["graphed_ms"]["local"] for b in bands if rows is None or b["rows"] in rows]


def test_sd3_band_share_is_the_median_measured_ratio() -> None:
    """Six SD3 bands on one H200: compiled/graph 0.763 to 0.816, median 0.7996."""
    ratios = sorted(compiled / graph for _, _, graph, compiled in SD3_BAND_COMPILE_MS)
    assert len(ratios) == 6 and 0.76 < ratios[0] < ratios[-1] < 0.82
    assert profile("sd3").compiled_band == pytest.approx((ratios[2] + ratios[3]) / 2, abs=0.005) == 0.80


@pytest.mark.parametrize(("family", "name", "fit_rows", "check_rows"), [
    ("sdxl", "steps-sdxl-bands.json", (128, 48), (64,)),
    ("flux", "steps-flux-bands.json", (128, 48), (80, 64)),
])
def test_band_shares_fitted_on_some_heights_hold_on_the_others(family: str, name: str, fit_rows: tuple[int, ...],
                                                               check_rows: tuple[int, ...]) -> None:
    """SDXL's and FLUX.1's shares: the median of their band heights ``fit_rows`` (every batch), and within 0.03
    of every held-out height's ratio. Every compiled band there was replayed as a graph (no eager fallback)."""
    share = profile(family).compiled_band
    assert share == pytest.approx(statistics.median(_band_ratios(name, fit_rows)), abs=0.005)
    held_out = _band_ratios(name, check_rows)
    assert held_out and all(abs(r - share) <= 0.03 for r in held_out)
    assert all(b["compiled_eager_keys"] == 0 for b in json.loads((RESULTS / name).read_text())["bands"])


def test_the_shares_hold_on_a_later_one_gpu_measurement() -> None:
    """Checked on measurements they were not fitted on: ``stadi bench steps`` on one H200
    (bench/results/steps-*.json). SD3's band steps (six heights and batches, compiled from the inductor cache)
    have a median compiled/graph ratio within 0.03 of its compiled_band; whole-frame steps of SD3, SDXL and
    FLUX.1 within 0.03 of COMPILED_WHOLE_FRAME."""
    ratios = _band_ratios("steps-sd3-warm.json")
    assert len(ratios) == 6
    assert abs(statistics.median(ratios) - profile("sd3").compiled_band) <= 0.03
    for name in ("steps-sd3-warm.json", "steps-sdxl-cold.json", "steps-flux-cold.json"):
        run = json.loads((RESULTS / name).read_text())
        ratio = run["worker_compiled"]["step_ms"] / run["worker_graphed"]["step_ms"]
        assert abs(ratio - COMPILED_WHOLE_FRAME) <= 0.03, name


def test_flux_constants_predict_the_peer_single_gpu_path() -> None:
    """FLUX.1's alpha and beta (fitted on stadi's band and whole-frame steps) predict a different harness on the
    same H200 and pipeline, xDiT's single-GPU path (bench/results/peer-flux-single.json), within 5%: uncompiled
    and compiled, 28 steps (its time also holds the prompt's encoding)."""
    peer = json.loads((RESULTS / "peer-flux-single.json").read_text())
    frame = CostModel(profile("flux"), 128, 128, 0.0)
    for name, cost in (("single", frame), ("single-compile", replace(frame, compiled=True))):
        predicted_s = peer["steps"] * cost.step_ms(128, 1, 1.0) / 1e3
        assert predicted_s == pytest.approx(peer["configs"][name]["latency_ms"] / 1e3, rel=0.05), name


def test_compiled_steps_get_cheaper_by_their_share() -> None:
    plain = CostModel(profile("sd3"), 128, 128, 150.0)
    compiled = replace(plain, compiled=True)
    assert compiled.step_ms(128, 1, 1.0) == pytest.approx(COMPILED_WHOLE_FRAME * plain.step_ms(128, 1, 1.0))
    assert compiled.step_ms(64, 2, 0.5, banded=True) == pytest.approx(
        profile("sd3").compiled_band * plain.step_ms(64, 2, 0.5, banded=True))
    # a synchronous step's per-layer collectives are not compiled away
    exchange = profile("sd3").band_exchange_ms / 0.5
    assert compiled.step_ms(64, 2, 0.5, banded=True, synchronous=True) - exchange == pytest.approx(
        profile("sd3").compiled_band * (plain.step_ms(64, 2, 0.5, banded=True, synchronous=True) - exchange))
    # the per-layer engine compiled whole frames only
    per_layer = replace(compiled, exchange="per-layer")
    assert per_layer.step_ms(64, 2, 0.5, banded=True) == replace(per_layer, compiled=False).step_ms(
        64, 2, 0.5, banded=True)
    units = reference_units("sd3", 128, 128)
    cut = StageCut(0, 12, len(units), units[12].name)
    args = (50, HYBRID_DEFAULTS["sd3"], units, [1.0, 0.6], cut)
    assert hybrid_seconds(compiled, *args) == hybrid_seconds(plain, *args)  # the worker never compiles them


def test_speeds_from_compiled_steps_are_not_counted_twice() -> None:
    p = plan(replace(PlanRequest.from_spec(_spec(True)), strategy="cfg"), [Device("H100"), Device("H100")])
    whole = step_cost_at_unit_speed(p, 0, True, compiled=True)
    assert whole == pytest.approx(COMPILED_WHOLE_FRAME * step_cost_at_unit_speed(p, 0, True))
    banded = plan(replace(PlanRequest.from_spec(_spec(True)), strategy="patch"), [Device("H100"), Device("H100")])
    assert step_cost_at_unit_speed(banded, 0, True, compiled=True) == pytest.approx(
        profile("sd3").compiled_band * step_cost_at_unit_speed(banded, 0, True))


@pytest.mark.parametrize(("compiled", "results", "measured_best"),
                         [(False, "speed-2xh200-all.json", "stadi"), (True, "speed-2xh200-compile.json", "cfg")])
def test_auto_at_half_the_sms_follows_the_measurement(compiled: bool, results: str, measured_best: str) -> None:
    level = json.loads((RESULTS / results).read_text())["levels"]["50"]["models"]["sd3"]
    measured = {n: s["latency_ms"] for n, s in level["strategies"].items() if n in ("cfg", "stadi")}
    if "stadi" not in measured:  # the compiled run measured auto, which re-planned to uncompiled stadi
        measured["stadi"] = level["strategies"]["auto"]["latency_ms"]
    assert min(measured, key=measured.__getitem__) == measured_best
    # speeds as the worker measures them: the single-GPU steps of that run against the unit cost
    spec = _spec(compiled)
    request = replace(PlanRequest.from_spec(spec), gpus_min=2, exchange="per-layer",
                      among=("single", "patch", "cfg", "stadi", "stadi+cfg", "hybrid"))  # what those runs ran
    frame = plan(replace(request, strategy="single", gpus_min=1), [Device("H200")])  # both branches, all rows
    unit = step_cost_at_unit_speed(frame, 0, True, compiled)
    speeds = [unit / ms for ms in level["strategies"]["single"]["per_rank_step_ms"]]
    chosen = plan(request, [Device("H200", index=i, speed=v) for i, v in enumerate(speeds)])
    assert chosen.strategy == measured_best
    assert chosen.predicted_seconds == pytest.approx(measured[measured_best] / 1e3, rel=0.1)


def _contexts(name: str, family: str, keep: Any) -> list[float]:
    """Graphed band steps with their context less the profile's alpha + beta * b * rows, for bands smaller than
    the frame (a frame-high band has no other band to read) that ``keep(batch, rows)`` selects."""
    p = profile(family)
    bands = json.loads((RESULTS / name).read_text())["bands"]
    return [b["graphed_ms"]["local"] - (p.alpha_ms + p.beta_ms * b["batch"] * b["rows"]) for b in bands
            if b["rows"] < 128 and keep(b["batch"], b["rows"])]


@pytest.mark.parametrize(("family", "fit", "check"), [
    ("sd3", ("steps-sd3-warm.json", lambda b, r: True), ("steps-sd3-cold.json", lambda b, r: True)),
    ("sdxl", ("steps-sdxl-bands.json", lambda b, r: b == 2), ("steps-sdxl-bands.json", lambda b, r: b == 1)),
    ("flux", ("steps-flux-bands.json", lambda b, r: r in (80, 64)), ("steps-flux-bands.json", lambda b, r: r == 48)),
])
def test_band_context_fitted_on_some_bands_holds_on_others(family: str, fit: tuple[str, Any],
                                                           check: tuple[str, Any]) -> None:
    """band_context_ms is the median of the fitted bands' extra cost, and every held-out band's extra cost is
    within 2.5 ms of it (SD3: a second run; SDXL: the other batch; FLUX.1: another height)."""
    context = profile(family).band_context_ms
    assert context == pytest.approx(statistics.median(_contexts(fit[0], family, fit[1])), abs=0.1)
    held_out = _contexts(check[0], family, check[1])
    assert held_out and all(abs(c - context) <= 2.5 for c in held_out), held_out
