"""Strategy ``cfg-stride`` (branch strides) on two ranks: the guidance branches on GPUs of unequal speed, the
slower one evaluating its branch once per window of k base steps.

Both ranks denoise the full frame, batch 1, one branch each (the plan's ``branch``; the ``uncond`` rank's
``stride`` is k, the plan's ``sync_period``).
- Warmup and the short lead window of (T - W) mod k steps (``sampling.subgrid``): as strategy ``cfg``, both
  ranks evaluate their branch at every step, the predictions are swapped (one all_gather) and guided, and both
  step the same full latent. At least one such step runs (W >= 1): the first window needs an unconditional
  prediction to guide with.
- Windows of k steps, starting at s = lead, lead + k, ...: the cond rank takes every step alone, guiding a
  fresh conditional prediction along the guidance direction (cond - uncond) of the latent that the last
  unconditional prediction it received was computed on (its own conditional prediction of that latent makes
  the other half; ``reguide``); meanwhile the uncond rank evaluates its branch once, on the latent of the
  window start. At the next window start one all_gather swaps the cond rank's latent and the uncond rank's
  prediction, so the slow rank has a whole window for its step and the direction the cond rank guides with is
  k to 2k - 1 steps old (1 to k in the first window, which reuses the lead's last one). The uncond rank skips
  the last window: nobody would read its prediction. Reusing the direction rather than the unconditional
  prediction itself keeps 7 to 18 dB more mean PSNR against serial on the trained models
  (bench/results/fidelity-*-small.json).
- The final latent is broadcast from the cond rank (both hold it) and decoded on rank 0.

With ``exact`` every step is a warmup step: equal to the serial run up to float error. The re-plan after
warmup re-asks the planner for strategy ``cfg-stride`` on the same two ranks: both hold the same latent and
scheduler state after a warmup step, so the branches may swap ranks and k may change with no state to move.
On a GPU each branch evaluation replays as a CUDA graph of the workspace; the exchanges run between them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from stadi.api import DiffusionJobSpec, Plan
from stadi_worker.engine.bands import Workspace, guide
from stadi_worker.engine.graphs import StepGraphs
from stadi_worker.engine.replan import replan_together
from stadi_worker.engine.result import GenerationResult
from stadi_worker.engine.runtime import DistContext
from stadi_worker.engine.sampling import BandSampler, Pace, StepTimer, initial_noise
from stadi_worker.models import ops_for
from stadi_worker.models.base import ModelOps, batch_branches
from stadi_worker.models.schedulers import make_scheduler


@dataclass
class BranchStrideResult(GenerationResult):
    # per base step this rank stepped the latent: the base index of the latent that the guidance direction it
    # used was computed on (the step itself in warmup and lead, older in the windows)
    uncond_from: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Roles:
    """Who runs which branch under a plan, and the uncond rank's stride k."""

    cond: int
    uncond: int
    stride: int

    @classmethod
    def of(cls, plan: Plan) -> Roles:
        by_branch = {r.branch: r for r in plan.ranks}
        return cls(by_branch["cond"].rank, by_branch["uncond"].rank, by_branch["uncond"].stride)


def window_starts(steps: int, warmup: int, stride: int) -> range:
    """The base indices where windows of ``stride`` steps start after warmup and the lead (``subgrid``'s)."""
    return range(warmup + (steps - warmup) % stride, steps, stride)


class _Branch:
    """This rank's branch evaluation: the full frame, batch 1, through the workspace's step graphs."""

    def __init__(self, ops: ModelOps, spec: DiffusionJobSpec, branch: str, cond: dict[str, torch.Tensor],
                 graphs: StepGraphs, whole: Any):
        self.ops, self.spec, self.branch, self.graphs, self.whole = ops, spec, branch, graphs, whole
        self.keys, self.values = list(cond), list(cond.values())
        self.key = ("cfg-stride", id(ops.denoiser), branch)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return self.ops(x, t, dict(zip(self.keys, cond, strict=True)), denoiser=self.whole)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.graphs.run(self.key, self._forward, x, t, *self.values)

    def profile_ms(self, x: torch.Tensor, t: torch.Tensor, repeats: int = 2) -> float | None:
        """On a GPU, the compute time of one evaluation replayed as a graph (a warmup step's time mixes in the
        eager run and the capture); None elsewhere."""
        if not self.graphs.enabled:
            return None
        while not self.graphs.captured(self.key, x, t, *self.values):
            self(x, t)
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            self(x, t)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)


def reguide(cond: torch.Tensor, direction: torch.Tensor, scale: float) -> torch.Tensor:
    """Guidance of a fresh conditional prediction along an earlier latent's direction (cond - uncond):
    ``guide(cond - direction, cond, scale)``. Only the direction is stale; it changes more slowly along the
    trajectory than the unconditional prediction itself, whose error the scale would amplify (scale - 1) times."""
    return cond + (scale - 1.0) * direction


def _swap(mine: torch.Tensor, timer: StepTimer) -> list[torch.Tensor]:
    """One all_gather of one tensor per rank: what each rank sent, by rank."""
    mine = mine.contiguous()
    parts = [torch.empty_like(mine) for _ in range(2)]
    with timer.waiting():
        dist.all_gather(parts, mine)
    return parts


def generate_branch_stride(pipe: Any, spec: DiffusionJobSpec, plan: Plan, ctx: DistContext, prompt: str, seed: int,
                           *, exact: bool, on_step: Callable[[int, int], None] | None, replan_after_warmup: bool,
                           on_replan: Callable[[GenerationResult], None] | None, pace: Pace | None, decode: bool,
                           workspace: Workspace) -> BranchStrideResult:
    """One image under a ``cfg-stride`` plan on this rank (see the module's docstring and ``generate.generate``)."""
    ops = ops_for(pipe, spec.model.family)
    graphs, whole = workspace.graphs_for(ops.device), workspace.step_denoiser(ops, spec)
    with torch.no_grad():
        encoded = ops.encode(spec, prompt, True)
    steps = spec.steps
    sampler = BandSampler(make_scheduler(ops, spec.scheduler), steps, ops.device)
    timer = StepTimer(ops.device)
    latents = initial_noise(ops.latent_shape(spec), seed, sampler.init_noise_sigma).to(ops.device, ops.dtype)
    result = BranchStrideResult(image=None, latents=None, step_ms=[], plan=plan)
    warmup = steps if exact else max(1, min(plan.warmup_steps, steps))
    roles = Roles.of(plan)

    def evaluator() -> _Branch:
        branch = plan.ranks[ctx.rank].branch
        return _Branch(ops, spec, branch, batch_branches(encoded, [branch]), graphs, whole)

    def evaluate(x: torch.Tensor, index: int) -> torch.Tensor:
        out = mine(sampler.scale(x, index), sampler.timesteps[index])
        result.evals.append(index)
        if pace is not None:  # CPU only: the running compute time reads host clocks
            pace(timer.running_compute_ms())
        return out

    def advance(eps: torch.Tensor, index: int, uncond_from: int) -> None:
        nonlocal latents
        latents = sampler.step(eps, index, latents)
        result.uncond_from.append(uncond_from)
        if on_step is not None:
            on_step(index + 1, steps)

    def split(index: int) -> torch.Tensor:
        """A step of both branches, swapped and guided on both ranks; returns its guidance direction."""
        timer.start()
        parts = _swap(evaluate(latents, index), timer)
        result.exchanges.append(index)
        timer.stop()
        uncond, cond = parts[roles.uncond], parts[roles.cond]
        advance(guide(uncond, cond, spec.guidance_scale), index, index)
        return cond - uncond

    mine = evaluator()
    with torch.no_grad():
        for index in range(warmup):  # at least one: ``direction`` is the last guidance direction
            direction = split(index)
        if replan_after_warmup and warmup < steps:
            plan = _replan(ctx, spec, plan, mine, sampler, latents, warmup, timer, workspace, result)
            roles, mine = Roles.of(plan), evaluator()
            if on_replan is not None and ctx.rank == 0:
                on_replan(result)
        starts = window_starts(steps, warmup, roles.stride)
        for index in range(warmup, starts.start):
            direction = split(index)
        direction_from = starts.start - 1
        start_conds: dict[int, torch.Tensor] = {}  # the cond rank's prediction at the window start, until it is paired
        for j, start in enumerate(starts):
            if ctx.rank == roles.cond:
                for index in range(start, start + roles.stride):
                    timer.start()
                    if index == start and j > 0:  # the uncond rank's prediction for the previous window start
                        uncond = _swap(latents.to(ops.dtype), timer)[roles.uncond]
                        direction_from = starts[j - 1]
                        direction = start_conds.pop(direction_from) - uncond
                        result.exchanges.append(index)
                    cond = evaluate(latents, index)
                    timer.stop()
                    if index == start and j < len(starts) - 1:  # paired with the next exchange's uncond
                        start_conds[start] = cond
                    advance(reguide(cond, direction, spec.guidance_scale), index, direction_from)
            elif j < len(starts) - 1:
                # the uncond rank: one evaluation on the window start's latent, sent at the next window start
                timer.start()
                uncond = evaluate(latents, start)
                latents = _swap(uncond, timer)[roles.cond]
                result.exchanges.append(starts[j + 1])
                timer.stop()
                if on_step is not None:
                    on_step(starts[j + 1], steps)
    result.step_ms = timer.ms()
    result.wait_ms = [max(w - c, 0.0) for w, c in zip(result.step_ms, timer.compute_ms(), strict=True)]
    final = latents.to(ops.dtype).contiguous()
    dist.broadcast(final, src=roles.cond)
    if on_step is not None and ctx.rank != roles.cond:
        on_step(steps, steps)  # the broadcast waited for the cond rank's last step
    if ctx.rank == 0:
        result.latents = final
        result.image = ops.decode(final) if decode else None
    return result


def _replan(ctx: DistContext, spec: DiffusionJobSpec, plan: Plan, mine: _Branch, sampler: BandSampler,
            latents: torch.Tensor, warmup: int, timer: StepTimer, workspace: Workspace,
            result: GenerationResult) -> Plan:
    """Measured compute per step -> speeds; rank 0 re-plans strategy cfg-stride on both ranks; both adopt it.

    Any gain is taken (threshold 0): a new split of the branches or a new k moves no state."""
    x, t = sampler.scale(latents, warmup), sampler.timesteps[warmup]
    profiled = mine.profile_ms(x, t)
    measured = profiled if profiled is not None else statistics.median(timer.compute_ms()[:warmup])
    compiled = workspace.compiles(spec)
    agreed = replan_together(ctx, spec, plan, measured, compiled_steps=compiled, compiled=compiled,
                             strategy="cfg-stride", threshold=0.0)
    result.measured_speeds, result.predicted_gain = agreed.speeds, agreed.gain
    result.replanned, result.plan = agreed.plan is not None, agreed.plan or plan
    return result.plan
