"""Start-up checks: environment parsing and plans that cannot run fail fast, on every rank, without a hang."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import job_spec, launch_ranks, make_plan
from stadi_worker.engine.plan_check import check_plan
from stadi_worker.engine.runtime import DistContext, init_from_env

from stadi.api import DiffusionJobSpec, Plan


def _ctx(world: int, rank: int = 0) -> DistContext:
    return DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")


def _spec(family: str = "sdxl", **extra) -> DiffusionJobSpec:
    return DiffusionJobSpec.model_validate(job_spec(family, **extra))


BAD_PLANS = {
    "world size": (make_plan("sdxl", [(0, 4), (4, 8), (8, 16)]), "3 ranks but the world size is 2"),
    "not tiling": (make_plan("sdxl", [(0, 8), (4, 16)]), "do not tile"),
    "granularity": (make_plan("sdxl", [(0, 6), (6, 16)], granularity=2), "granularity 2"),
    "band granularity": (make_plan("sdxl", [(0, 8), (8, 16)], granularity=8, latent=16) | {
        "ranks": [{"rank": 0, "gpu": "cpu", "speed": 1.0, "rows": [0, 4]},
                  {"rank": 1, "gpu": "cpu", "speed": 1.0, "rows": [4, 16]}]}, "not a multiple of the granularity"),
    "short of H": (make_plan("sdxl", [(0, 4), (4, 12)]), "not at the latent height 16"),
    "latent size": (make_plan("sdxl", [(0, 16), (16, 32)], latent=32), "differs from the job's 16x16"),
    "family": (make_plan("sd3", [(0, 8), (8, 16)]), "family 'sd3'"),
    "split without both branches": (make_plan("sdxl", [(0, 16), (0, 16)], ["cond", "cond"]), "do not tile"),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_runtime_check_plan_rejects(case: str) -> None:
    plan, message = BAD_PLANS[case]
    with pytest.raises(ValueError, match="plan rejected") as err:
        check_plan(Plan.model_validate(plan), _spec(), _ctx(2, rank=1))
    assert message in str(err.value)
    assert str(err.value).startswith("rank 1: ")


def test_runtime_check_plan_accepts_and_needs_guidance_for_split() -> None:
    check_plan(Plan.model_validate(make_plan("sdxl", [(0, 4), (4, 16)])), _spec(), _ctx(2))
    split = Plan.model_validate(make_plan("sdxl", [(0, 16), (0, 16)], ["cond", "uncond"], strategy="cfg"))
    check_plan(split, _spec(), _ctx(2))
    with pytest.raises(ValueError, match="guidanceScale > 1"):
        check_plan(split, _spec(guidance=1.0), _ctx(2))


def test_runtime_init_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_from_env("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device.type) == (0, 1, "gloo", "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_from_env("cpu")
    with pytest.raises(ValueError, match="cpu or cuda"):
        init_from_env("tpu")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["world size", "not tiling", "band granularity"])
def test_runtime_bad_plan_fails_fast_on_every_rank(case: str, tiny_dir, model_cache: Path,
                                                    tmp_path: Path) -> None:
    tiny_dir("sdxl")
    plan, message = BAD_PLANS[case]
    cfg = {"spec": job_spec("sdxl"), "prompt": "x", "seed": 0, "cache_dir": str(model_cache),
           "runs": [{"name": "bad", "plan": plan, "exact": True}]}
    launch = launch_ranks(2, cfg, tmp_path, timeout=60)
    assert launch.returncodes == [1, 1], launch.stderr  # None would mean killed at the timeout: a hang
    for rank, err in enumerate(launch.stderr):
        assert f"rank {rank}: plan rejected" in err and message in err, err[-2000:]
    assert launch.seconds < 50
