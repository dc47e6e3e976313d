"""Strategy hybrid in the API and the planner: knobs and defaults, the stage cut, the cost, auto."""

from __future__ import annotations

import pytest

from stadi.api import DiffusionJobSpec, Plan, RankPlan
from stadi.families import HybridSchedule
from stadi.planner import Device, PlanRequest, default_link, plan
from stadi.planner.evaluate import predict_seconds
from stadi.planner.stage_split import balanced_boundary, carry_bytes, reference_units, share

H100 = Device("H100")


def spec(**parallelism: object) -> DiffusionJobSpec:
    return DiffusionJobSpec.model_validate({
        "model": {"family": parallelism.pop("family", "sdxl"), "source": "random://full"},
        "prompts": ["a lighthouse"], "output": {"uri": "file:///tmp/out"}, "parallelism": parallelism,
    })


def test_family_defaults_and_overrides() -> None:
    assert spec(strategy="hybrid").hybrid_schedule == HybridSchedule(12, 4e-4, 5, 15)
    assert spec(strategy="hybrid", family="sd3").hybrid_schedule == HybridSchedule(15, 5e-4, 5, 40)
    assert spec(hybrid={"pipelineSteps": 8, "capStep": 20}).hybrid_schedule == HybridSchedule(12, 4e-4, 8, 20)
    assert spec(family="sd15").hybrid_schedule is None


@pytest.mark.parametrize(("parallelism", "message"), [
    ({"strategy": "hybrid", "gpus": {"min": 3, "max": 4}}, "'hybrid' runs on exactly 2 GPUs"),
    ({"strategy": "hybrid", "family": "sd15"}, "'hybrid' splits the denoiser of sdxl, sd3 models only"),
    ({"strategy": "stadi", "hybrid": {"window": 4}}, "parallelism.hybrid: applies to strategy hybrid or auto"),
    ({"strategy": "hybrid", "hybrid": {"window": 0}}, "parallelism.hybrid.window"),
])
def test_validation_names_the_field(parallelism: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**parallelism)


def test_hybrid_needs_guidance() -> None:
    with pytest.raises(ValueError, match="'hybrid' splits the guidance branches and needs guidanceScale > 1"):
        DiffusionJobSpec.model_validate({
            "model": {"family": "sdxl", "source": "random://full"}, "prompts": ["x"], "guidanceScale": 1.0,
            "output": {"uri": "file:///tmp/out"}, "parallelism": {"strategy": "hybrid"}})


# --- the cut: one exact unit per reference model --------------------------------------------------------


def test_sd3_medium_cut_at_equal_speeds_is_transformer_blocks_12() -> None:
    units = reference_units("sd3", 128, 128)
    assert len(units) == 24
    assert balanced_boundary(units, 1.0, 1.0) == 12
    p = plan(PlanRequest("sd3", 1024, 1024, strategy="hybrid"), [H100, H100])
    assert [r.layers for r in p.ranks] == [(0, 12), (12, 24)]
    assert p.hybrid is not None and p.hybrid.boundary_layer == "transformer_blocks.12"


def test_sdxl_cut_at_equal_speeds_is_up_blocks_0_resnets_1() -> None:
    """SDXL base at 1024^2: 34 units; the 10-layer attentions at 32^2 hold ~10% of the work each, so the most
    even cut leaves stage 0 with the down path, the mid block and up_blocks.0's first resnet and attention."""
    units = reference_units("sdxl", 128, 128)
    assert len(units) == 34
    assert units[18].name == "up_blocks.0.resnets.1"
    assert balanced_boundary(units, 1.0, 1.0) == 18
    assert share(units, 18) == pytest.approx(0.548, abs=1e-3)
    p = plan(PlanRequest("sdxl", 1024, 1024, strategy="hybrid"), [H100, H100])
    assert [r.layers for r in p.ranks] == [(0, 18), (18, 34)]
    assert p.hybrid is not None and (p.hybrid.units, p.hybrid.boundary_layer) == (34, "up_blocks.0.resnets.1")


def test_sdxl_handover_carries_the_open_skips() -> None:
    """Cut after conv_in: the hidden state and conv_in's skip (320 x 128 x 128 fp16 each) cross the link."""
    units = reference_units("sdxl", 128, 128)
    assert carry_bytes(units, 1) == 2 * 320 * 128 * 128 * 2
    assert carry_bytes(units, len(units) - 1) == 320 * 128 * 128 * 2  # only the hidden state is left


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("ratio", [1.0, 0.75, 0.5, 0.3])
def test_stage_split_respects_the_speed_ratio(family: str, ratio: float) -> None:
    """The slower GPU gets the smaller share, and the stage times are as equal as whole units allow."""
    units = reference_units(family, 128, 128)
    biggest = max(u.macs for u in units) / sum(u.macs for u in units)
    for fast_first in (True, False):
        v0, v1 = (1.0, ratio) if fast_first else (ratio, 1.0)
        f = share(units, balanced_boundary(units, v0, v1))
        assert abs(f / v0 - (1 - f) / v1) <= biggest / ratio + 1e-9
        if ratio < 1.0:
            assert (f > 0.5) == fast_first
    p = plan(PlanRequest(family, 1024, 1024, strategy="hybrid"), [H100, Device("H100", load=1 - ratio)])
    fast, slow = p.ranks
    assert (fast.speed, slow.speed) == (1.0, pytest.approx(ratio))

    def work(r: RankPlan) -> float:
        assert r.layers is not None
        return share(units, r.layers[1]) - share(units, r.layers[0])

    assert abs(work(fast) - work(slow) / ratio) <= biggest / ratio + 1e-9
    if ratio < 1.0:
        assert work(fast) > work(slow)


# --- cost ------------------------------------------------------------------------------------------------


def test_sd3_prediction_by_hand() -> None:
    """SD3 at 1024^2 on (H100, H100 at 50% load) over NVLink, family defaults: cap 40, k 5 -> 45 split steps
    and a window of 5 (the first fills the hand-over). c(h, b) = 1.06 + 0.203 * b * h ms at speed 1.

    Split step: the slow branch, 27.044 / 0.5 ms, plus the prediction swap (0.05 ms + 16 ch x 2 B x 128^2 /
    150 GB/s) and the decision broadcast (0.05 ms). Window: the H100 takes 16 of the 24 blocks: both stages
    run 2/3 x 53.028 / 1 = 1/3 x 53.028 / 0.5 = 35.352 ms; the hand-over is (64^2 + 333 text) tokens x 1536
    x 2 B x batch 2 over NVLink plus 0.05 ms; each window step swaps the guided prediction."""
    p = plan(PlanRequest("sd3", 1024, 1024, strategy="hybrid"), [H100, Device("H100", load=0.5)])
    assert [r.layers for r in p.ranks] == [(0, 16), (16, 24)]
    swap = 0.05 + 16 * 2 * 128 * 128 / 150e9 * 1e3
    split = (1.06 + 0.203 * 128) / 0.5 + swap + 0.05
    stage = 2 / 3 * (1.06 + 0.203 * 256)
    hand = 0.05 + (64 * 64 + 333) * 1536 * 2 * 2 / 150e9 * 1e3
    expected = (45 * split + (2 * stage + hand + swap) + 4 * (stage + hand + swap)) / 1e3
    assert p.predicted_seconds == pytest.approx(expected, abs=1e-6)
    assert p.alternatives["hybrid"] == p.predicted_seconds


def test_evaluate_reproduces_the_planner() -> None:
    p = plan(PlanRequest("sdxl", 1024, 1024, strategy="hybrid"), [H100, Device("A100-80GB")])
    speeds = [r.speed for r in p.ranks]
    link = default_link((r.gpu, r.node) for r in p.ranks)
    # the plan keeps speeds to 6 digits
    assert predict_seconds(p, speeds, 4, 4, 20, link) == pytest.approx(p.predicted_seconds, rel=1e-5)


def test_no_window_predicts_the_condition_split() -> None:
    """A cap beyond the last step predicts no window: cfg's steps plus the decision broadcast."""
    pool = [H100, Device("H100", load=0.5)]
    p = plan(PlanRequest("sdxl", 1024, 1024, strategy="hybrid", hybrid=HybridSchedule(12, 4e-4, 5, 50)), pool)
    assert p.predicted_seconds == pytest.approx(p.alternatives["cfg"] + 50 * 0.05 / 1e3, abs=1e-6)


def test_auto_compares_hybrid_with_the_same_cost_model() -> None:
    """Family defaults: the 5-step window does not pay for its filling step on equal H100s, so auto keeps cfg;
    a window over the whole run (cap 0, k 50) makes hybrid the fastest and auto picks it."""
    default = plan(PlanRequest("sdxl", 1024, 1024), [H100, H100])
    assert default.strategy == "cfg" and "hybrid" in default.alternatives
    assert default.alternatives["hybrid"] > default.alternatives["cfg"]
    long = plan(PlanRequest("sdxl", 1024, 1024, hybrid=HybridSchedule(12, 4e-4, 50, 0)), [H100, H100])
    assert long.strategy == "hybrid"
    assert long.predicted_seconds == min(long.alternatives.values())
    assert long.hybrid is not None and long.hybrid.pipeline_steps == 50


def test_hybrid_plan_refusals_name_the_reason() -> None:
    with pytest.raises(ValueError, match="'hybrid' needs exactly 2 GPUs"):
        plan(PlanRequest("sdxl", 1024, 1024, strategy="hybrid", gpus_min=3), [H100] * 3)
    with pytest.raises(ValueError, match="no stage split for model family 'sd15'"):
        plan(PlanRequest("sd15", 512, 512, strategy="hybrid"), [H100, H100])
    with pytest.raises(ValueError, match="needs guidanceScale > 1"):
        plan(PlanRequest("sd3", 1024, 1024, strategy="hybrid", guidance=False), [H100, H100])


def test_plan_validation_of_the_cut() -> None:
    p = plan(PlanRequest("sd3", 1024, 1024, strategy="hybrid"), [H100, H100])
    p.validate_for(2)
    doc = p.model_dump()
    doc["ranks"][1]["layers"] = (13, 24)
    with pytest.raises(ValueError, match="must cut the 24 units in two non-empty stages"):
        Plan.model_validate(doc).validate_for(2)
    doc["hybrid"] = None
    with pytest.raises(ValueError, match="needs its hybrid schedule"):
        Plan.model_validate(doc).validate_for(2)
