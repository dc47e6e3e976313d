"""The re-plan after warmup may leave a slow rank out (docs/architecture.md, "Execution"): it idles for the rest
of the image.

Tiny SD3 at 512 px on 2 Gloo ranks: at this size the planner keeps both CPU ranks up to a speed ratio of
about 1.8 (a condition split) and runs the image on the fast rank alone beyond it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HEIGHT, STEPS, job_spec, launch_ranks, make_plan
from stadi_worker.engine.replan import replan

from stadi.api import DiffusionJobSpec, Plan

PROMPT = "a red bicycle in the snow"
SEED = 3
WARMUP = 2
PX = 512
LATENT = PX // 8
MAX_ABS = 1e-4  # fp32: synchronous bands reproduce the serial latent up to summation order


def _spec_doc(**parallelism: Any) -> dict[str, Any]:
    return job_spec("sd3", height=PX, width=PX,
                    parallelism={"warmupSteps": WARMUP, "minEffectiveSteps": 1, **parallelism})


def _plan(bands: list[tuple[int, int]] | None = None, strategy: str = "stadi") -> dict[str, Any]:
    doc = make_plan("sd3", bands or [(0, LATENT // 2), (LATENT // 2, LATENT)], warmup=WARMUP, strategy=strategy,
                    latent=LATENT)
    for r in doc["ranks"]:
        r.update(node="n1", gpu_index=r["rank"] + 4)  # device indices unlike process ranks
    return doc


def _idle_plan(idle: int) -> dict[str, Any]:
    """What a job's later images run under once the re-plan left rank ``idle`` out."""
    doc = _plan(strategy="single")
    doc["warmup_steps"] = 0
    for r in doc["ranks"]:
        r["rows"] = [0, 0] if r["rank"] == idle else [0, LATENT]
        r["idle"] = r["rank"] == idle
    return doc


# --- replan, pure --------------------------------------------------------------------------------------


@pytest.mark.parametrize("slow", [0, 1])
def test_replan_leaves_the_slow_rank_idle_in_process_order(slow: int) -> None:
    spec = DiffusionJobSpec.model_validate(_spec_doc())
    speeds = [0.05, 0.05]
    speeds[slow] /= 8
    new, gain = replan(spec, Plan.model_validate(_plan()), speeds)
    assert new is not None and gain > spec.parallelism.replan_threshold
    new.validate_for(2)
    fast = 1 - slow
    assert new.strategy == "single"
    assert [r.rank for r in new.ranks] == [0, 1]
    assert [r.idle for r in new.ranks] == [r == slow for r in (0, 1)]
    assert new.ranks[fast].rows == (0, LATENT) and new.ranks[slow].rows == (0, 0)
    # every process keeps its device; the idle one is named as the planner names GPUs it leaves out
    assert [r.gpu_index for r in new.ranks] == [4, 5]
    assert new.ranks[slow].speed == pytest.approx(speeds[slow], rel=1e-4)
    assert new.left_out == [f"n1/cpu#{slow + 4}"]


def test_replan_keeps_both_ranks_at_a_moderate_slowdown() -> None:
    spec = DiffusionJobSpec.model_validate(_spec_doc())
    new, _ = replan(spec, Plan.model_validate(_plan()), [0.05, 0.05 / 1.25])
    assert new is not None and not any(r.idle for r in new.ranks) and new.left_out == []


def test_replan_respects_the_jobs_minimum_of_gpus() -> None:
    spec = DiffusionJobSpec.model_validate(_spec_doc(gpus={"min": 2, "max": 2}))
    new, _ = replan(spec, Plan.model_validate(_plan()), [0.05, 0.05 / 8])
    assert new is None or not any(r.idle for r in new.ranks)


@pytest.mark.parametrize("strategy", ["stadi", "patch"])
def test_a_forced_strategy_of_two_or_more_ranks_keeps_both(strategy: str) -> None:
    spec = DiffusionJobSpec.model_validate(_spec_doc(strategy=strategy))
    new, _ = replan(spec, Plan.model_validate(_plan(strategy=strategy)), [0.05, 0.05 / 8])
    assert new is None or not any(r.idle for r in new.ranks)


def test_the_gain_threshold_still_applies() -> None:
    spec = DiffusionJobSpec.model_validate(_spec_doc(replanThreshold=0.99))
    new, gain = replan(spec, Plan.model_validate(_plan()), [0.05, 0.05 / 8])
    assert new is None and 0 < gain <= 0.99


# --- 2 Gloo ranks --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idle_runs(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    tiny_dir("sd3")
    cfg = {"spec": _spec_doc(), "prompt": PROMPT, "seed": SEED, "cache_dir": str(model_cache),
           "runs": [
               {"name": "serial", "plan": None},
               {"name": "slow1", "plan": _plan(), "replan": True, "slowdown": {"1": 8.0}},
               {"name": "slow0", "plan": _plan(), "replan": True, "slowdown": {"0": 8.0}},
               {"name": "moderate", "plan": _plan(), "replan": True, "slowdown": {"1": 1.25}},
               {"name": "idle_from_start", "plan": _idle_plan(1)},
           ]}
    return launch_ranks(2, cfg, tmp_path_factory.mktemp("idle")).check()


def _err(launch: Any, name: str) -> float:
    return float((launch.result(name)["latents"] - launch.result("serial")["latents"]).abs().max())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("slow", [1, 0])
def test_a_much_slower_rank_idles_after_warmup(idle_runs, slow: int) -> None:
    res = idle_runs.result(f"slow{slow}")
    plan = Plan.model_validate(res["plan"])
    print(f"slow rank {slow}: speeds {res['measured_speeds']}, final {plan.strategy} "
          f"idle {[r.idle for r in plan.ranks]}; max abs vs serial {_err(idle_runs, f'slow{slow}'):.2e}")
    assert res["replanned"]
    assert [r.idle for r in plan.ranks] == [r == slow for r in (0, 1)]
    latents = res["latents"]  # on rank 0, whether it computed or idled
    assert latents.shape == (1, 16, LATENT, LATENT) and bool(torch.isfinite(latents).all())
    assert res["evals"][slow] == list(range(WARMUP))  # no step after the re-plan
    assert res["evals"][1 - slow] == list(range(STEPS))
    # synchronous warmup bands are exact, and the fast rank then runs the serial loop on the whole latent
    assert _err(idle_runs, f"slow{slow}") <= MAX_ABS


@pytest.mark.timeout(300)
def test_a_moderately_slower_rank_keeps_working(idle_runs) -> None:
    res = idle_runs.result("moderate")
    plan = Plan.model_validate(res["plan"])
    print(f"moderate: speeds {res['measured_speeds']}, final {plan.strategy}")
    assert not any(r.idle for r in plan.ranks)
    assert all(len(e) > WARMUP for e in res["evals"])


@pytest.mark.timeout(300)
def test_a_plan_idle_from_the_start_runs_on_the_active_rank(idle_runs) -> None:
    res = idle_runs.result("idle_from_start")
    assert res["evals"] == [list(range(STEPS)), []]
    assert _err(idle_runs, "idle_from_start") <= MAX_ABS


@pytest.mark.timeout(300)
def test_job_with_an_idle_rank_0_writes_every_image(tiny_dir, model_cache: Path, tmp_path: Path) -> None:
    """Rank 0 (the writer) is the slow one: the first image's re-plan leaves it idle, the second image runs
    idle from the start; rank 0 still writes both images and the manifest, and progress reaches the end."""
    from stadi_worker.job.manifest import Manifest

    tiny_dir("sd3")
    doc = _spec_doc()
    doc["prompts"] = ["a red bicycle", "a blue boat"]
    cfg = {"spec": doc, "plan": _plan(), "slowdown": {"0": 8.0}, "cache_dir": str(model_cache)}
    launch = launch_ranks(2, cfg, tmp_path, module="idle_job").check()
    out = launch.out
    manifest = Manifest.from_json((out / "manifest.json").read_bytes())
    assert manifest.plan.replanned
    assert [r.idle for r in manifest.plan.final.ranks] == [True, False]
    assert all((out / image.name).stat().st_size > 0 for image in manifest.images)
    r0, r1 = manifest.ranks
    assert len(r0.step_ms) == WARMUP and len(r1.step_ms) == 2 * STEPS
    events = json.loads((out / "events.json").read_text())
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps if e["images_done"] == 1][-1] == STEPS  # the image run idle from its start
    assert events[-1]["kind"] == "done" and events[-1]["images_done"] == 2
    replans = [e for e in events if e["kind"] == "replan"]
    assert len(replans) == 1 and replans[0]["rows"] == [[0, 0], [0, LATENT]] and replans[0]["step"] == WARMUP


@pytest.mark.timeout(300)
def test_an_idle_rank_between_active_ones(tiny_dir, model_cache: Path, tmp_path: Path) -> None:
    """3 ranks, the middle one idle from the start: the active ranks' band group and the condition split's
    groups leave it out, the final gather does not, and the synchronous result is the serial one."""
    tiny_dir("sd3")
    latent = HEIGHT // 8
    bands = make_plan("sd3", [(0, 8), (0, 0), (8, latent)])
    split = make_plan("sd3", [(0, latent), (0, 0), (0, latent)], ["cond", "both", "uncond"], strategy="cfg")
    for doc in (bands, split):
        doc["ranks"][1]["idle"] = True
    cfg = {"spec": job_spec("sd3"), "prompt": PROMPT, "seed": SEED, "cache_dir": str(model_cache),
           "runs": [{"name": "serial", "plan": None},
                    {"name": "bands", "plan": bands, "exact": True},
                    {"name": "split", "plan": split}]}
    launch = launch_ranks(3, cfg, tmp_path).check()
    for name in ("bands", "split"):
        res = launch.result(name)
        print(f"{name}: max abs vs serial {_err(launch, name):.2e}")
        assert res["evals"] == [list(range(STEPS)), [], list(range(STEPS))]
        assert _err(launch, name) <= MAX_ABS


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hold", [True, False])
def test_an_idle_rank_outlasts_the_group_timeout_in_the_store(hold: bool, tmp_path: Path) -> None:
    """An image longer than the process-group timeout: an idle rank waiting in the final gather times out
    (without the hold), one waiting in the rendezvous store first does not."""
    config = {"timeout_s": 1.0, "busy_s": 4.0, "hold": hold}
    run = launch_ranks(2, config, tmp_path, timeout=60, module="hold_job")
    if hold:
        assert run.returncodes == [0, 0], run.stderr
        for rank in range(2):
            assert json.loads((run.out / f"rank{rank}.json").read_text()) == [0.0, 1.0]
    else:
        assert run.returncodes[1] == 1, run.stderr
        assert "timed out" in run.stderr[1].lower() or "timeout" in run.stderr[1].lower(), run.stderr[1][-2000:]
