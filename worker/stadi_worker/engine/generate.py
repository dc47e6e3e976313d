"""The public entry of the engine: generate one image under a plan on the ranks of a process group.

It checks the plan, then hands the image to the strategy that runs it: ``serial`` on a single rank,
``hybrid`` for strategy hybrid, ``branch_stride`` for strategies cfg-stride and cfg-stride+band, ``banded`` for
every plan that splits the latent into bands (with or without the condition split). Nothing here reads the
environment: the caller passes the engine's options (in the ``Workspace``) and, for tests and benchmarks only,
``pace``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stadi.api import BRANCH_STRIDES, DiffusionJobSpec, Plan
from stadi_worker.engine.banded import generate_banded
from stadi_worker.engine.bands import Workspace
from stadi_worker.engine.branch_stride import generate_branch_stride
from stadi_worker.engine.hybrid import generate_hybrid
from stadi_worker.engine.plan_check import check_plan
from stadi_worker.engine.result import GenerationResult
from stadi_worker.engine.runtime import DistContext
from stadi_worker.engine.sampling import Pace
from stadi_worker.engine.serial import generate_serial


def generate(pipe: Any, spec: DiffusionJobSpec, plan: Plan, ctx: DistContext, prompt: str, seed: int, *,
             exact: bool = False, on_step: Callable[[int, int], None] | None = None,
             replan_after_warmup: bool = False, on_replan: Callable[[GenerationResult], None] | None = None,
             pace: Pace | None = None, decode: bool = True, workspace: Workspace | None = None) -> GenerationResult:
    """Generate one image of ``prompt`` under ``plan``; call on every rank of the group.

    Each rank denoises its band of latent rows; the first ``plan.warmup_steps`` steps (all of them with
    ``exact``, which also ignores strides) exchange fresh activations at every layer; later steps run on
    each rank's strided sub-grid with the other bands' activations from the last exchange. With
    ``replan_after_warmup`` the warmup is profiled and the plan may change (``on_replan`` gets the measured
    speeds and the new plan on rank 0), also to one that leaves ranks idle. An idle rank runs no step (from
    the start under a plan that marks it idle, as a job's later images); ``on_step`` hears of it when the
    image is done. ``pace(compute_ms)``, called after each denoiser step with its compute time so far, lets
    a test or benchmark emulate a slower device (CPU pacing). The final latent is gathered from the active
    ranks' bands on every rank, idle ones included, and (unless ``decode`` is False, as in the speed
    benchmark) decoded on rank 0, idle or not. Pass one ``workspace`` to every call on the same pipeline so
    the band wrappers and CUDA graphs of a plan are built once.
    """
    check_plan(plan, spec, ctx)
    workspace = workspace or Workspace()
    if ctx.world_size == 1:
        return generate_serial(pipe, spec, prompt, seed, on_step=on_step, decode=decode, workspace=workspace)
    if plan.strategy == "hybrid":
        return generate_hybrid(pipe, spec, plan, ctx, prompt, seed, exact=exact, on_step=on_step,
                               replan_after_warmup=replan_after_warmup, on_replan=on_replan, pace=pace,
                               decode=decode, workspace=workspace)
    if plan.strategy in BRANCH_STRIDES:
        return generate_branch_stride(pipe, spec, plan, ctx, prompt, seed, exact=exact, on_step=on_step,
                                      replan_after_warmup=replan_after_warmup, on_replan=on_replan, pace=pace,
                                      decode=decode, workspace=workspace)
    return generate_banded(pipe, spec, plan, ctx, prompt, seed, exact=exact, on_step=on_step,
                           replan_after_warmup=replan_after_warmup, on_replan=on_replan, pace=pace,
                           decode=decode, workspace=workspace)
