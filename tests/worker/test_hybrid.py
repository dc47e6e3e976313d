"""Strategy hybrid on 2 Gloo ranks with tiny models: the switch rule, the stage functions, the window.

Plans are built by the planner for two equal CPU ranks; tiny models have fewer units than the reference
models the plan's cut indexes, so the worker re-derives the cut for them at the plan's speeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import STEPS, job_spec, launch_ranks
from stadi_worker.engine.hybrid import Switch, resolve_cut, switch_step
from stadi_worker.engine.sampling import BandSampler, initial_noise
from stadi_worker.job.loading import load_pipeline
from stadi_worker.models import ops_for
from stadi_worker.models.base import batch_branches
from stadi_worker.models.schedulers import make_scheduler

from stadi.api import DiffusionJobSpec, HybridPlan, ModelSource, Plan
from stadi.families import HybridSchedule
from stadi.planner import LINKS, Device, PlanRequest, plan
from stadi.planner.stage_split import share

PROMPT, SEED = "a red bicycle in the snow", 3
OTHER_PROMPT = "a lighthouse at dusk"
MAX_ABS = 1e-4  # fp32: the condition split (batch 1 per rank) against unified CFG (batch 2)
CPU2 = [Device("CPU", index=0, speed=1.0), Device("CPU", index=1, speed=1.0)]


def schedule(window: int = 2, threshold: float = 0.0, k: int = 3, cap: int = STEPS) -> HybridPlan:
    return HybridPlan(window=window, slope_threshold=threshold, pipeline_steps=k, cap_step=cap, units=2,
                      boundary_layer="x")


def hybrid_plan(family: str, warmup: int = 0, **knobs: Any) -> dict[str, Any]:
    """The planner's hybrid plan for two equal CPU ranks, with the given schedule knobs."""
    sched = schedule(**knobs)
    request = PlanRequest(family, 128, 128, steps=STEPS, strategy="hybrid", warmup_steps=warmup,
                          link_gbytes_per_s=LINKS["pcie"],
                          hybrid=HybridSchedule(sched.window, sched.slope_threshold, sched.pipeline_steps,
                                                sched.cap_step))
    return plan(request, CPU2).model_dump(mode="json")


# --- the switch rule -------------------------------------------------------------------------------------

# d_t of the tiny SDXL's first steps (as recorded by a run); slope over L=2: .060 .038 .0195 .0086 .0051
RECORDED = [0.1892, 0.1186, 0.0686, 0.0425, 0.0305, 0.0249, 0.0202, 0.0182]


@pytest.mark.parametrize(("sched", "start"), [
    (schedule(threshold=0.01), 6),  # the slope over the last 2 steps first drops below 0.01 at step 5
    (schedule(threshold=0.02), 5),
    (schedule(threshold=0.01, cap=4), 4),  # the cap comes first
    (schedule(threshold=0.0), None),  # never: no cap within the run
    (schedule(window=12, threshold=1.0, cap=15), None),  # SDXL's L: needs 13 values
])
def test_switch_step_follows_the_slope_rule(sched: HybridPlan, start: int | None) -> None:
    assert switch_step(RECORDED, sched, STEPS) == start


def test_rising_discrepancy_never_triggers_the_slope_rule() -> None:
    assert switch_step(list(reversed(RECORDED)), schedule(threshold=1.0), STEPS) is None


def test_window_lasts_k_steps_and_ends_with_the_run() -> None:
    sw = Switch(schedule(k=3, cap=2), STEPS)
    assert [sw.mode(i) for i in range(STEPS)] == ["split"] * 2 + ["pipe"] * 3 + ["split"] * 3
    late = Switch(schedule(k=5, cap=6), STEPS)
    assert [late.mode(i) for i in range(STEPS)] == ["split"] * 6 + ["pipe"] * 2
    exact = Switch(schedule(k=5, cap=0), STEPS, disabled=True)
    assert {exact.mode(i) for i in range(STEPS)} == {"split"}


# --- stage functions -------------------------------------------------------------------------------------


def _pipe(family: str, cache: Path) -> Any:
    return load_pipeline(ModelSource(family=family, source="random://tiny", dtype="float32"), "cpu", cache)


def _spec(family: str) -> DiffusionJobSpec:
    return DiffusionJobSpec.model_validate(job_spec(family))


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_stages_reproduce_the_denoiser_at_every_cut(family: str, tiny_dir, model_cache: Path) -> None:
    tiny_dir(family)
    ops = ops_for(_pipe(family, model_cache), family)
    spec = _spec(family)
    cond = batch_branches(ops.encode(spec, PROMPT, True), ["uncond", "cond"])
    c, h, w = ops.latent_shape(spec)
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500.0)
    with torch.no_grad():
        ref = ops(x, t, cond)
        for b in range(1, len(ops.units(h, w))):
            st = ops.stages(h, w, b)
            assert torch.equal(st.second(st.first(x, t, cond), t, cond), ref), st.units[b].name


def test_reference_models_have_the_planner_tables() -> None:
    """The published SDXL and SD3-medium shapes (built on the meta device) linearise to the tables the
    planner cuts: same architecture parameters, every block listed."""
    from stadi_worker.models.sd3 import transformer
    from stadi_worker.models.sdxl import unet as sdxl_unet
    from stadi_worker.models.unet import check_unet

    from stadi.planner.stage_split import SD3_MEDIUM, SDXL, DiTArch, UNetArch, reference_units

    with torch.device("meta"):
        unet, dit = sdxl_unet("full"), transformer("full")
    assert UNetArch.from_config(unet.config) == SDXL
    assert DiTArch.from_config(dit.config) == SD3_MEDIUM
    check_unet(unet, list(reference_units("sdxl", 128, 128)))
    assert len(dit.transformer_blocks) == len(reference_units("sd3", 128, 128))


# --- the window on two ranks -----------------------------------------------------------------------------


def emulate(family: str, cache: Path, p: Plan, window: range, guided: bool) -> torch.Tensor:
    """One process, the hybrid schedule written out: unified CFG outside ``window``; inside, stage 1 on the
    stage-0 output of the step before (of this step at the first window step). ``guided=False`` uses the
    conditional prediction alone inside the window."""
    pipe = _pipe(family, cache)
    ops, spec = ops_for(pipe, family), _spec(family)
    both = batch_branches(ops.encode(spec, PROMPT, True), ["uncond", "cond"])
    sampler = BandSampler(make_scheduler(ops, spec.scheduler), spec.steps, ops.device)
    c, h, w = ops.latent_shape(spec)
    latents = initial_noise((c, h, w), SEED, sampler.init_noise_sigma)
    stages = ops.stages(h, w, resolve_cut(p, ops.units(h, w))[1])
    previous: tuple[torch.Tensor, ...] = ()
    with torch.no_grad():
        for i in range(spec.steps):
            x, t = sampler.scale(latents, i), sampler.timesteps[i]
            if i in window:
                fresh = stages.first(torch.cat([x, x]), t, both)
                uncond, cond = stages.second(fresh if i == window.start else previous, t, both).chunk(2)
                previous = fresh
            else:
                uncond, cond = ops(torch.cat([x, x]), t, both).chunk(2)
            eps = uncond + spec.guidance_scale * (cond - uncond) if guided or i not in window else cond
            latents = sampler.step(eps, i, latents)
    return latents


def graph_runs(family: str) -> list[dict[str, Any]]:
    """Two images of the "window" plan through one workspace's ``ReplayGraphs`` (the second, of another
    prompt, replays every key), and the second image's eager reference."""
    p = hybrid_plan(family, k=3, cap=3)
    return [{"name": "graphs_a", "plan": p, "workspace": "ws"},
            {"name": "graphs_b", "plan": p, "workspace": "ws", "prompt": OTHER_PROMPT},
            {"name": "window_b", "plan": p, "prompt": OTHER_PROMPT}]


def _launch(family: str, runs: list[dict[str, Any]], cache: Path, workdir: Path) -> Any:
    cfg = {"spec": job_spec(family), "prompt": PROMPT, "seed": SEED, "cache_dir": str(cache),
           "runs": [{"name": "serial", "plan": None}, *runs, *graph_runs(family)]}
    return launch_ranks(2, cfg, workdir, module="hybrid_runs").check()


@pytest.fixture(scope="module")
def sdxl_runs(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tiny_dir("sdxl")
    f = "sdxl"
    return _launch(f, [
        {"name": "no_window", "plan": hybrid_plan(f)},
        {"name": "fill_only", "plan": hybrid_plan(f, k=1, cap=3)},
        {"name": "window", "plan": hybrid_plan(f, k=3, cap=3)},
        {"name": "slope", "plan": hybrid_plan(f, threshold=0.01)},
        # rank 0 (cond branch, stage 0 at equal speeds) runs 3x slower: the re-plan moves work off it
        {"name": "replan", "plan": hybrid_plan(f, warmup=2, k=3, cap=4), "replan": True, "slowdown": {0: 3.0}},
    ], model_cache, tmp_path_factory.mktemp("hybrid-sdxl"))


@pytest.fixture(scope="module")
def sd3_runs(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tiny_dir("sd3")
    f = "sd3"
    return _launch(f, [
        {"name": "exact", "plan": hybrid_plan(f, k=3, cap=3), "exact": True},
        {"name": "no_window", "plan": hybrid_plan(f)},
        {"name": "fill_only", "plan": hybrid_plan(f, k=1, cap=3)},
        {"name": "window", "plan": hybrid_plan(f, k=3, cap=3)},
        {"name": "slope", "plan": hybrid_plan(f, threshold=10.0)},
    ], model_cache, tmp_path_factory.mktemp("hybrid-sd3"))


def _runs(request: pytest.FixtureRequest, family: str) -> Any:
    return request.getfixturevalue(f"{family}_runs")


def _err(launch: Any, name: str) -> float:
    return float((launch.result(name)["latents"] - launch.result("serial")["latents"]).abs().max())


def _recorded(launch: Any, name: str) -> dict[str, Any]:
    """Rank 0's record; both ranks must have recorded the same modes, discrepancies and window."""
    r0, r1 = launch.result(name)["ranks"]
    assert r0[:4] == r1[:4]
    modes, ds, window, layer, steps, wait_ms, _ = r0
    assert steps == len(modes) == STEPS and len(wait_ms) == STEPS
    return {"modes": modes, "ds": ds, "window": window, "layer": layer}


@pytest.mark.parametrize(("family", "name"), [("sdxl", "no_window"), ("sd3", "no_window"), ("sd3", "exact")])
def test_outside_the_window_the_output_is_unified_cfg(request: pytest.FixtureRequest, family: str,
                                                      name: str) -> None:
    launch = _runs(request, family)
    rec = _recorded(launch, name)
    assert rec["modes"] == ["split"] * STEPS and rec["window"] is None
    assert _err(launch, name) <= MAX_ABS


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_the_first_window_step_fills_the_handover_and_is_exact(request: pytest.FixtureRequest,
                                                               family: str) -> None:
    """A window of one step: stage 1 waits for this step's stage 0, so nothing is stale."""
    launch = _runs(request, family)
    rec = _recorded(launch, "fill_only")
    assert rec["modes"] == ["split"] * 3 + ["pipe"] + ["split"] * 4 and rec["window"] == (3, 4)
    assert _err(launch, "fill_only") <= MAX_ABS


@pytest.mark.parametrize(("family", "layer"), [("sdxl", "up_blocks.0.resnets.1"), ("sd3", "transformer_blocks.1")])
def test_inside_the_window_guidance_is_applied(request: pytest.FixtureRequest, model_cache: Path, family: str,
                                               layer: str) -> None:
    """Steps 3-5 pipelined: the output is the hybrid schedule with guided predictions, which differs from
    the same schedule with the conditional prediction alone (and, being stale, from the serial run). The tiny
    models' cut at equal speeds: SDXL (24 units) before up_blocks.0.resnets.1, SD3 (2 blocks) before block 1."""
    launch = _runs(request, family)
    rec = _recorded(launch, "window")
    assert rec["modes"] == ["split"] * 3 + ["pipe"] * 3 + ["split"] * 2
    assert rec["window"] == (3, 6) and rec["layer"] == layer
    p = Plan.model_validate(launch.result("window")["plan"])
    got = launch.result("window")["latents"]
    guided = emulate(family, model_cache, p, range(3, 6), guided=True)
    cond_only = emulate(family, model_cache, p, range(3, 6), guided=False)
    assert float((got - guided).abs().max()) <= 5 * MAX_ABS
    assert float((got - cond_only).abs().max()) > 100 * MAX_ABS
    assert _err(launch, "window") > 10 * MAX_ABS


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_the_switch_happens_where_the_slope_rule_says(request: pytest.FixtureRequest, family: str) -> None:
    """The window starts at the step the rule gives for the d_t the run recorded, before the cap."""
    launch = _runs(request, family)
    plan_doc = launch.result("slope")["plan"]
    sched = HybridPlan.model_validate(plan_doc["hybrid"])
    full = _recorded(launch, "no_window")["ds"]  # the same steps, never switching
    assert len(full) == STEPS
    rec = _recorded(launch, "slope")
    start = switch_step(full, sched, STEPS)
    assert start is not None and start < sched.cap_step
    assert rec["window"] == (start, min(start + sched.pipeline_steps, STEPS))
    assert rec["ds"] == full[:start]
    assert rec["modes"].index("pipe") == start


def test_replan_moves_work_off_the_slow_rank(sdxl_runs: Any, model_cache: Path) -> None:
    """Rank 0 is 3x slower in the warmup: the re-plan gives it the smaller stage, in the plan's reference cut
    and in the tiny model's cut alike, and the run goes on through the window."""
    from stadi.planner.stage_split import reference_units

    res = sdxl_runs.result("replan")
    assert res["replanned"]
    speeds = res["measured_speeds"]
    assert speeds[0] < speeds[1] / 1.5  # paced 3x; warmup medians on a shared 2-core machine are noisy
    p = Plan.model_validate(res["plan"])
    p.validate_for(2)
    stage0 = next(r.rank for r in p.ranks if r.layers is not None and r.layers[0] == 0)

    def slow_share(units: Any, boundary: int) -> float:
        first = share(units, boundary)
        return first if stage0 == 0 else 1 - first

    reference = reference_units("sdxl", 16, 16)
    assert slow_share(reference, p.ranks[stage0].layers[1]) < 0.5  # type: ignore[index]
    rec = _recorded(sdxl_runs, "replan")
    assert rec["window"] == (4, 7)
    tiny = ops_for(_pipe("sdxl", model_cache), "sdxl").units(16, 16)
    assert slow_share(tiny, [u.name for u in tiny].index(rec["layer"])) < 0.5


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_the_denoiser_calls_run_through_the_workspace_graphs(request: pytest.FixtureRequest, family: str) -> None:
    """Every denoiser call goes through the workspace's StepGraphs under one key per function: the split
    step's branch on both ranks, stage 0 on one rank, stage 1 on the other. Replayed on the copies of the
    first image's inputs, the second image (another prompt) is the eager run's, bit for bit: the step
    functions read nothing but their inputs."""
    launch = _runs(request, family)
    assert torch.equal(launch.result("graphs_a")["latents"], launch.result("window")["latents"])
    assert torch.equal(launch.result("graphs_b")["latents"], launch.result("window_b")["latents"])
    # per key after both images (5 split and 3 window steps each): calls, and replays (calls after the
    # eager one and the capture); stage 0 skips the window's last step
    expected = {"hybrid-split": (10, 8), "hybrid-stage0": (4, 2), "hybrid-stage1": (6, 4)}
    stages = []
    for keys in (r[6] for r in launch.result("graphs_b")["ranks"]):
        got = {k[0]: (calls, replays) for k, calls, replays in keys}
        assert len(got) == len(keys) == 2 and "hybrid-split" in got
        stages += [tag for tag in got if tag != "hybrid-split"]
        assert got == {tag: expected[tag] for tag in got}
    assert sorted(stages) == ["hybrid-stage0", "hybrid-stage1"]
