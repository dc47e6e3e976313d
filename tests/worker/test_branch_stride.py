"""Strategies cfg-stride and cfg-stride+band (branch strides, docs/architecture.md "Execution") on 2 Gloo ranks: a
tiny SDXL for the schedule (exact mode, evaluation counts, which unconditional prediction each step reuses, a
paced slow rank, either rank order, the step graphs, the uncond bands and their exchange), the built-in trained
models for fidelity against serial."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import job_spec, launch_ranks, make_plan

PROMPT, OTHER_PROMPT, SEED = "a red bicycle in the snow", "a lighthouse at dusk", 3
STEPS = 12
MAX_ABS = 1e-4  # fp32: the condition split (batch 1 per rank) against unified CFG (batch 2)


def stride_plan(k: int, warmup: int, order: tuple[str, str] = ("cond", "uncond"), family: str = "sdxl",
                steps: int = STEPS, latent: int = 16) -> dict[str, Any]:
    """A cfg-stride plan: one rank per branch over the whole frame, the uncond rank at stride ``k``."""
    doc = make_plan(family, [(0, latent), (0, latent)], list(order), warmup=warmup, steps=steps,
                    strategy="cfg-stride", latent=latent)
    for r in doc["ranks"]:
        r["stride"] = k if r["branch"] == "uncond" else 1
    doc["sync_period"] = k
    return doc


def band_plan(k: int, warmup: int, shared: int = 8, order: tuple[str, str] = ("cond", "uncond"),
              latent: int = 16) -> dict[str, Any]:
    """A cfg-stride+band plan: the cond rank also evaluates the uncond branch's top ``shared`` rows."""
    doc = stride_plan(k, warmup, order, latent=latent) | {"strategy": "cfg-stride+band"}
    for r in doc["ranks"]:
        if r["branch"] == "cond":
            r["uncond_rows"] = [0, shared]
        else:
            r["rows"] = [shared, latent]
    return doc


# The schedules written out (T = 12). k = 2, W = 1: lead (T - W) mod k = 1 step (index 1), windows start at
# 2, 4, 6, 8, 10; the uncond rank evaluates 0, 1 (split), then the window starts but the last (W + lead +
# windows - 1 = 6). k = 3, W = 2: lead 1 step (index 2), windows at 3, 6, 9; uncond evaluations 2 + 1 + 2.
# The cond rank guides the first window along the lead's last guidance direction, later windows along the
# direction of the previous window start.
SCHEDULES = {
    "k2": {"lead": 2, "k": 2, "uncond_evals": [0, 1, 2, 4, 6, 8], "exchanges": [0, 1, 4, 6, 8, 10],
           "uncond_from": [0, 1, 1, 1, 2, 2, 4, 4, 6, 6, 8, 8]},
    "k3": {"lead": 3, "k": 3, "uncond_evals": [0, 1, 2, 3, 6], "exchanges": [0, 1, 2, 6, 9],
           "uncond_from": [0, 1, 2, 2, 2, 2, 3, 3, 3, 6, 6, 6]},
}


@pytest.fixture(scope="module")
def tiny(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tiny_dir("sdxl")
    spec = job_spec("sdxl", steps=STEPS)
    runs = [
        {"name": "serial", "plan": None},
        {"name": "exact", "plan": stride_plan(2, 1), "exact": True},
        {"name": "k2", "plan": stride_plan(2, 1)},
        {"name": "k2_swapped", "plan": stride_plan(2, 1, order=("uncond", "cond"))},
        {"name": "k3", "plan": stride_plan(3, 2)},
        {"name": "k3_paced", "plan": stride_plan(3, 2), "slowdown": {"1": 3.0}},
        # the cond rank 0 paced 3x: the re-plan (strategy cfg-stride on the same ranks) measures it
        {"name": "replan", "plan": stride_plan(2, 2), "replan": True, "slowdown": {"0": 3.0}},
        {"name": "band_exact", "plan": band_plan(2, 1), "exact": True},
        {"name": "band_k2", "plan": band_plan(2, 1)},
        {"name": "band_k2_paced", "plan": band_plan(2, 1), "slowdown": {"1": 3.0}},
        {"name": "band_k2_swapped", "plan": band_plan(2, 1, order=("uncond", "cond"))},
        {"name": "band_k1", "plan": band_plan(1, 2)},
        # W = 8, k = 2: windows at 8 and 10, so the one band evaluation (at 8) is the synchronous first one
        {"name": "k2_w8", "plan": stride_plan(2, 8)},
        {"name": "band_k2_w8", "plan": band_plan(2, 8)},
        {"name": "band_replan", "plan": band_plan(2, 2), "replan": True, "slowdown": {"1": 3.0}},
    ]
    config = {"spec": spec, "prompt": PROMPT, "seed": SEED, "cache_dir": str(model_cache), "runs": runs}
    return launch_ranks(2, config, tmp_path_factory.mktemp("branch-stride")).check()


def _err(launch: Any, name: str, ref: str = "serial") -> float:
    return float((launch.result(name)["latents"] - launch.result(ref)["latents"]).abs().max())


def test_the_start_up_check_takes_branch_strides_only_under_cfg_stride() -> None:
    """A cfg-stride plan passes; the cond rank (which steps the latent) at a stride, a third (idle) rank, an uncond
    stride under strategy cfg (which swaps predictions at every step) and a job without guidance do not."""
    from stadi_worker.engine.plan_check import check_plan
    from stadi_worker.engine.runtime import DistContext

    from stadi.api import DiffusionJobSpec, Plan

    def check(doc: dict[str, Any], world: int = 2, guidance: float = 5.0) -> None:
        ctx = DistContext(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"), backend="gloo")
        check_plan(Plan.model_validate(doc), DiffusionJobSpec.model_validate(job_spec("sdxl", guidance)), ctx)

    check(stride_plan(3, 2, steps=8))
    check(stride_plan(3, 2, order=("uncond", "cond"), steps=8))
    slow_cond = stride_plan(2, 2, steps=8)
    slow_cond["ranks"][0]["stride"] = 2
    third = stride_plan(2, 2, steps=8)
    third["ranks"].append({**third["ranks"][0], "rank": 2, "rows": [0, 0], "idle": True})
    cases = {"its stride must be 1": (slow_cond, 2, 5.0), "needs 2 ranks": (third, 3, 5.0),
             "need a plan without condition split": (stride_plan(2, 2, steps=8) | {"strategy": "cfg"}, 2, 5.0),
             "needs guidanceScale > 1": (stride_plan(2, 2, steps=8), 2, 1.0)}
    for message, (doc, world, guidance) in cases.items():
        with pytest.raises(ValueError, match=message):
            check(doc, world, guidance)


def test_exact_mode_equals_serial(tiny: Any) -> None:
    res = tiny.result("exact")
    assert res["evals"] == [list(range(STEPS))] * 2
    assert res["uncond_from"] == [list(range(STEPS))] * 2
    assert _err(tiny, "exact") <= MAX_ABS


@pytest.mark.parametrize("name", ["k2", "k3", "k3_paced"])
def test_the_uncond_rank_evaluates_once_per_window_but_the_last(tiny: Any, name: str) -> None:
    """The cond rank evaluates every step; the uncond rank W + lead + (windows - 1) times (paced 3x slower too),
    and both exchange at every warmup and lead step and at every window start but the first."""
    expected = SCHEDULES[name.removesuffix("_paced")]
    res = tiny.result(name)
    assert res["evals"] == [list(range(STEPS)), expected["uncond_evals"]]
    assert res["exchanges"] == [expected["exchanges"]] * 2


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_each_unconditional_prediction_is_reused_k_steps(tiny: Any, name: str) -> None:
    """After the lead, every step guides along the direction of the previous window start (the lead's last one in
    the first window): each is used k times, k to 2k - 1 steps after the latent it was computed on (1 to k in the
    first window)."""
    expected = SCHEDULES[name]
    uncond_from = tiny.result(name)["uncond_from"][0]
    assert uncond_from == expected["uncond_from"]
    lead, k = expected["lead"], expected["k"]
    assert uncond_from[:lead] == list(range(lead))
    assert set(Counter(uncond_from[lead:]).values()) == {k}
    ages = [i - src for i, src in enumerate(uncond_from) if i >= lead + k]
    assert min(ages) == k and max(ages) == 2 * k - 1


def test_the_windows_compute_the_written_out_schedule(tiny: Any, model_cache: Path) -> None:
    """One process runs the k = 3 schedule written out (each step: cond on its latent, guided along the direction
    cond - uncond of the latent of ``uncond_from``): the ranks' latent is that one, and the reuse is visible against
    serial, and against guiding with the unconditional prediction of that latent itself."""
    from stadi_worker.engine.bands import guide
    from stadi_worker.engine.branch_stride import reguide
    from stadi_worker.engine.sampling import BandSampler, initial_noise
    from stadi_worker.job.loading import load_pipeline
    from stadi_worker.models import ops_for
    from stadi_worker.models.base import batch_branches
    from stadi_worker.models.schedulers import make_scheduler

    from stadi.api import DiffusionJobSpec, ModelSource

    torch.set_num_threads(1)
    spec = DiffusionJobSpec.model_validate(job_spec("sdxl", steps=STEPS))
    pipe = load_pipeline(ModelSource(family="sdxl", source="random://tiny", dtype="float32"), "cpu", model_cache)
    ops = ops_for(pipe, "sdxl")
    encoded = ops.encode(spec, PROMPT, True)
    cond = {b: batch_branches(encoded, [b]) for b in ("uncond", "cond")}
    scale = spec.guidance_scale

    def written_out(direction: bool) -> torch.Tensor:
        sampler = BandSampler(make_scheduler(ops, spec.scheduler), STEPS, ops.device)
        latents = initial_noise(ops.latent_shape(spec), SEED, sampler.init_noise_sigma)
        preds: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for i, src in enumerate(SCHEDULES["k3"]["uncond_from"]):
                x, t = sampler.scale(latents, i), sampler.timesteps[i]
                preds.append({b: ops(x, t, cond[b]) for b in ("uncond", "cond")})
                u, c = preds[src]["uncond"], preds[i]["cond"]
                eps = reguide(c, preds[src]["cond"] - u, scale) if direction and src != i else guide(u, c, scale)
                latents = sampler.step(eps, i, latents)
        return latents

    got = tiny.result("k3")["latents"]
    assert float((got - written_out(direction=True)).abs().max()) <= MAX_ABS
    assert float((got - written_out(direction=False)).abs().max()) > 100 * MAX_ABS
    assert _err(tiny, "k3") > 100 * MAX_ABS


def test_the_schedule_does_not_depend_on_timing_or_rank_order(tiny: Any) -> None:
    """The uncond rank paced 3x slower computes the same image; so do the branches on the other ranks (the
    final latent comes from the cond rank, rank 1 there, to rank 0)."""
    assert torch.equal(tiny.result("k3_paced")["latents"], tiny.result("k3")["latents"])
    swapped = tiny.result("k2_swapped")
    assert swapped["uncond_from"][1] == SCHEDULES["k2"]["uncond_from"]
    assert _err(tiny, "k2_swapped", ref="k2") <= 1e-6


def test_replan_measures_the_slow_cond_rank(tiny: Any) -> None:
    """The re-plan after warmup measures rank 0 (cond, paced 3x) slower and keeps a cfg-stride plan of the two
    ranks; a new plan gives the cond branch, which runs every step, to the faster rank."""
    from stadi.api import Plan

    res = tiny.result("replan")
    speeds = res["measured_speeds"]
    assert speeds[0] < speeds[1] / 1.5  # paced 3x; warmup medians on a shared 2-core machine are noisy
    plan = Plan.model_validate(res["plan"])
    plan.validate_for(2)
    assert plan.strategy == "cfg-stride"
    if res["replanned"]:
        assert plan.ranks[1].branch == "cond"


def test_the_branch_evaluations_run_through_the_workspace_graphs(tiny_dir, model_cache: Path,
                                                                  tmp_path: Path) -> None:
    """Every evaluation goes through the workspace's StepGraphs under one key per branch; replayed on the
    copies of the first image's inputs (``ReplayGraphs``, the CUDA graphs' contract on the CPU), the second
    image (another prompt) equals its eager run bit for bit."""
    tiny_dir("sdxl")
    plan = stride_plan(2, 1)
    runs = [{"name": "graphs_a", "plan": plan, "workspace": "ws"},
            {"name": "graphs_b", "plan": plan, "workspace": "ws", "prompt": OTHER_PROMPT},
            {"name": "eager_b", "plan": plan, "prompt": OTHER_PROMPT}]
    config = {"spec": job_spec("sdxl", steps=STEPS), "prompt": PROMPT, "seed": SEED,
              "cache_dir": str(model_cache), "runs": runs}
    launch = launch_ranks(2, config, tmp_path, module="hybrid_runs").check()
    assert torch.equal(launch.result("graphs_b")["latents"], launch.result("eager_b")["latents"])
    # per rank after both images: (calls, replays) of its branch's key; the eager call and the capture replay
    # nothing
    evals = {"cond": STEPS, "uncond": len(SCHEDULES["k2"]["uncond_evals"])}
    for rank, keys in enumerate(r[6] for r in launch.result("graphs_b")["ranks"]):
        branch = ("cond", "uncond")[rank]
        assert [(k[0], k[2], calls, replays) for k, calls, replays in keys] == [
            ("cfg-stride", branch, 2 * evals[branch], 2 * evals[branch] - 2)]


def test_the_start_up_check_takes_uncond_bands_only_under_cfg_stride_band() -> None:
    """A cfg-stride+band plan passes in either rank order; uncond bands that leave rows uncovered, uncond_rows on a
    cfg-stride plan, or a cond rank that does not cover the whole frame do not."""
    from stadi_worker.engine.plan_check import check_plan
    from stadi_worker.engine.runtime import DistContext

    from stadi.api import DiffusionJobSpec, Plan

    def check(doc: dict[str, Any]) -> None:
        ctx = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
        check_plan(Plan.model_validate(doc), DiffusionJobSpec.model_validate(job_spec("sdxl", steps=STEPS)), ctx)

    check(band_plan(2, 1))
    check(band_plan(2, 1, order=("uncond", "cond")))
    gap = band_plan(2, 1)
    gap["ranks"][1]["rows"] = [12, 16]
    on_cfg_stride = band_plan(2, 1) | {"strategy": "cfg-stride"}
    without = band_plan(2, 1)
    del without["ranks"][0]["uncond_rows"]
    short_cond = band_plan(2, 1)
    short_cond["ranks"][0]["rows"] = [0, 8]
    cases = {"do not tile": gap, "belong to the cond rank of a cfg-stride\\+band plan only": on_cfg_stride,
             "needs uncond_rows on its cond rank": without, "branch 'cond' end at row 8": short_cond}
    for message, doc in cases.items():
        with pytest.raises(ValueError, match=message):
            check(doc)


def test_band_exact_mode_equals_serial(tiny: Any) -> None:
    res = tiny.result("band_exact")
    assert res["band_evals"] == [[], []]
    assert _err(tiny, "band_exact") <= MAX_ABS


@pytest.mark.parametrize("name", ["band_k2", "band_k2_paced"])
def test_both_ranks_evaluate_their_uncond_band_at_each_window_start_but_the_last(tiny: Any, name: str) -> None:
    """k = 2, W = 1 (windows at 2, 4, 6, 8, 10): each rank evaluates its uncond band at 2, 4, 6 and 8; the cond
    rank also its branch at every step, the uncond rank nothing else after the lead. The bands exchange once per
    layer at the first (fresh context) and then one bucketed collective per window start; the guidance reuses
    the directions of cfg-stride's schedule."""
    res = tiny.result(name)
    starts = [2, 4, 6, 8]
    assert res["band_evals"] == [starts, starts]
    assert res["evals"] == [sorted(list(range(STEPS)) + starts), SCHEDULES["k2"]["uncond_evals"]]
    assert res["exchanges"] == [SCHEDULES["k2"]["exchanges"]] * 2
    assert res["uncond_from"][0] == SCHEDULES["k2"]["uncond_from"]
    layers = res["band_collectives"][0]["layer"]
    assert layers > 0 and res["band_collectives"] == [{"layer": layers, "window": len(starts) - 1}] * 2


def test_two_synchronous_bands_make_the_whole_uncond_branch(tiny: Any) -> None:
    """Where the only band evaluation is an image's first (per-layer exchange, fresh context), the two bands
    assembled are the uncond branch's prediction: the image equals cfg-stride's with the same schedule."""
    res = tiny.result("band_k2_w8")
    assert res["band_evals"] == [[8], [8]]
    assert res["band_collectives"][0].get("window", 0) == 0
    assert _err(tiny, "band_k2_w8", ref="k2_w8") <= MAX_ABS


def test_later_bands_read_stale_context_whatever_the_timing_or_rank_order(tiny: Any) -> None:
    """With W = 1 the bands after the first read the other band's context of the previous window start: the image
    differs from cfg-stride's with the same schedule (fidelity on the trained models: test_branch_stride_trained);
    the uncond rank paced 3x slower computes the same image, and so do the branches on the other ranks."""
    assert _err(tiny, "band_k2", ref="k2") > 10 * MAX_ABS
    assert torch.equal(tiny.result("band_k2_paced")["latents"], tiny.result("band_k2")["latents"])
    assert _err(tiny, "band_k2_swapped", ref="band_k2") <= 1e-6


def test_band_stride_one_guides_along_the_last_steps_direction(tiny: Any) -> None:
    """k = 1: every step after warmup is a window start, and guides along the direction of the step before it
    (the uncond rank's bands of a window start arrive at the next one), whose uncond prediction is assembled from
    the two bands; the last step's bands are never evaluated: nobody would read them."""
    res = tiny.result("band_k1")
    assert res["uncond_from"][0] == [0, 1, *range(1, STEPS - 1)]
    assert res["band_evals"] == [list(range(2, STEPS - 1))] * 2
    assert res["band_collectives"][0]["window"] == STEPS - 4


def test_band_replan_keeps_the_strategy_and_measures_whole_branches(tiny: Any) -> None:
    """The re-plan after warmup measures the paced uncond rank slower from its whole-frame warmup steps and keeps
    a cfg-stride+band plan in which the slower rank keeps the uncond branch (how the bands are cut depends on the
    measured ratio, noisy on a shared 2-core machine)."""
    from stadi.api import Plan

    res = tiny.result("band_replan")
    speeds = res["measured_speeds"]
    assert speeds[1] < speeds[0] / 1.5
    plan = Plan.model_validate(res["plan"])
    plan.validate_for(2)
    assert plan.strategy == "cfg-stride+band"
    assert plan.ranks[1].branch == "uncond" and plan.ranks[0].uncond_rows is not None
