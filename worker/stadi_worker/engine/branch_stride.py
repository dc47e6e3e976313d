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

Strategy ``cfg-stride+band`` is the same schedule with the uncond branch cut in two bands: the cond rank also
evaluates the top rows of the uncond branch (its ``uncond_rows``) on the window start's latent, right after the
swap, and the uncond rank only the rest (its ``rows``), so the slower GPU's evaluation is shorter and k can be
smaller (k = 1 too: every step guides along the direction of the step before it). The two bands run under the
band wrappers of a two-band group with its own process group (``_UncondBand``): the first of an image exchanges
per layer (fresh buffers), later ones read the other band's context of the previous window start and start one
bucketed exchange, settled at the next (``comm.CommManager``). The uncond rank sends its band in a full-frame
tensor; the cond rank fills in its own band before taking the guidance direction.

With ``exact`` every step is a warmup step: equal to the serial run up to float error. The re-plan after
warmup re-asks the planner for the plan's strategy on the same two ranks: both hold the same latent and
scheduler state after a warmup step, and no band has been evaluated yet, so the branches may swap ranks and k
and the bands may change with no state to move. On a GPU each evaluation (branch or band) replays as a CUDA
graph of the workspace; the exchanges run between them.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from stadi.api import DiffusionJobSpec, Plan
from stadi_worker.engine.bands import Workspace, guide
from stadi_worker.engine.comm import BandLayout, CommManager
from stadi_worker.engine.graphs import StepGraphs
from stadi_worker.engine.layers import DenoiserPatch
from stadi_worker.engine.replan import replan_together
from stadi_worker.engine.result import GenerationResult
from stadi_worker.engine.runtime import DistContext
from stadi_worker.engine.sampling import BandSampler, Pace, StepTimer, initial_noise, job_sampler
from stadi_worker.models import ops_for
from stadi_worker.models.base import ModelOps, batch_branches


@dataclass
class BranchStrideResult(GenerationResult):
    # per base step this rank stepped the latent: the base index of the latent that the guidance direction it
    # used was computed on (the step itself in warmup and lead, older in the windows)
    uncond_from: list[int] = field(default_factory=list)
    # cfg-stride+band: the base indices of this rank's evaluations of its uncond band (also in ``evals``)
    band_evals: list[int] = field(default_factory=list)
    # and the collectives of the band exchange this image launched (CommManager's counts: layer, window)
    band_collectives: dict[str, int] = field(default_factory=dict)


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


class _UncondBand:
    """This rank's band of the uncond branch under cfg-stride+band: the band wrappers of the two-band group (cond
    rank's ``uncond_rows``, uncond rank's ``rows``, in world-rank order) with its own process group, evaluated on
    the window start's full latent."""

    def __init__(self, ops: ModelOps, plan: Plan, ctx: DistContext, graphs: StepGraphs, denoiser: Any,
                 extrapolate: bool = True):
        bands = tuple(r.uncond_rows if r.uncond_rows is not None else r.rows for r in plan.ranks)
        self.rows = bands[ctx.rank]
        # its own group: the band exchange in flight never sits in the way of the latent swaps on the world's
        group = dist.new_group(list(range(ctx.world_size)))
        self.comm = CommManager(layout=BandLayout(bands, ctx.rank, plan.latent_height), group=group,
                                extrapolate_starts=extrapolate)
        self.patch = DenoiserPatch(ops.denoiser, self.comm)
        self.ops, self.graphs, self.denoiser = ops, graphs, denoiser
        self.fresh = True
        self.keys: list[str] = []
        self.values: list[torch.Tensor] = []

    def enter(self, cond: dict[str, torch.Tensor], timer: StepTimer) -> None:
        """Use the band for one image: the uncond conditioning, the step timer, fresh context."""
        self.keys, self.values = list(cond), list(cond.values())
        self.comm.waiting = timer.waiting
        self.fresh = True  # the buffers hold another image's context: the first evaluation exchanges per layer

    def _forward(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return self.ops(x, t, dict(zip(self.keys, cond, strict=True)), denoiser=self.denoiser)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: int) -> torch.Tensor:
        """The uncond prediction of our rows of the full-frame input ``x`` at base step ``index``."""
        self.comm.begin_step(sync=self.fresh, mode="exchange", index=index)
        self.fresh = False
        key = ("cfg-stride+band", id(self), "sync" if self.comm.sync else "exchange")
        self.patch.apply()
        try:
            out = self.graphs.run(key, self._forward, x[..., self.rows[0]:self.rows[1], :], t, *self.values)
        finally:
            self.patch.restore()
        self.comm.end_step()  # outside the graph: starts this window's exchange
        return out

    def leave(self) -> None:
        self.comm.settle()  # nothing in flight when the image ends


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
    """One image under a ``cfg-stride`` or ``cfg-stride+band`` plan on this rank (see the module's docstring and
    ``generate.generate``)."""
    ops = ops_for(pipe, spec.model.family)
    graphs, whole = workspace.graphs_for(ops.device), workspace.step_denoiser(ops, spec)
    with torch.no_grad():
        encoded = ops.encode(spec, prompt, True)
    steps = spec.steps
    sampler = job_sampler(ops, spec)
    timer = StepTimer(ops.device)
    latents = initial_noise(ops.latent_shape(spec), seed, sampler.init_noise_sigma).to(ops.device, ops.dtype)
    result = BranchStrideResult(image=None, latents=None, step_ms=[], plan=plan)
    warmup = steps if exact else max(1, min(plan.warmup_steps, steps))
    roles = Roles.of(plan)

    def evaluator() -> _Branch:
        branch = plan.ranks[ctx.rank].branch
        return _Branch(ops, spec, branch, batch_branches(encoded, [branch]), graphs, whole)

    def sharing() -> _UncondBand | None:
        """cfg-stride+band: this rank's uncond band under the current plan, entered for this image."""
        if plan.strategy != "cfg-stride+band":
            return None
        key = ("cfg-stride+band", id(ops.denoiser), tuple((r.rows, r.uncond_rows) for r in plan.ranks))
        found = workspace.keep(key, lambda: _UncondBand(ops, plan, ctx, graphs,
                                                        workspace.step_denoiser(ops, spec, banded=True)))
        found.enter(batch_branches(encoded, ["uncond"]), timer)
        counted.update(found.comm.collectives)
        return found

    def paced(out: torch.Tensor, index: int) -> torch.Tensor:
        result.evals.append(index)
        if pace is not None:  # CPU only: the running compute time reads host clocks
            pace(timer.running_compute_ms())
        return out

    def evaluate(x: torch.Tensor, index: int) -> torch.Tensor:
        return paced(mine(sampler.scale(x, index), sampler.timesteps[index]), index)

    def evaluate_band(x: torch.Tensor, index: int) -> torch.Tensor:
        assert band is not None
        result.band_evals.append(index)
        return paced(band(sampler.scale(x, index), sampler.timesteps[index], index), index)

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
    band: _UncondBand | None = None
    counted: Counter[str] = Counter()  # the band's counts before this image
    try:
        with torch.no_grad():
            for index in range(warmup):  # at least one: ``direction`` is the last guidance direction
                direction = split(index)
            if replan_after_warmup and warmup < steps:
                plan = _replan(ctx, spec, plan, mine, sampler, latents, warmup, timer, workspace, result)
                roles, mine = Roles.of(plan), evaluator()
                if on_replan is not None and ctx.rank == 0:
                    on_replan(result)
            starts = window_starts(steps, warmup, roles.stride)
            if len(starts) > 1:  # a band is evaluated in every window but the last
                band = sharing()
            for index in range(warmup, starts.start):
                direction = split(index)
            direction_from = starts.start - 1
            start_conds: dict[int, torch.Tensor] = {}  # the cond rank's prediction at a window start, until paired
            start_bands: dict[int, torch.Tensor] = {}  # the cond rank's uncond band at a window start, likewise
            for j, start in enumerate(starts):
                last = j == len(starts) - 1
                if ctx.rank == roles.cond:
                    for index in range(start, start + roles.stride):
                        timer.start()
                        if index == start and j > 0:  # the uncond rank's prediction for the previous window start
                            uncond = _swap(latents.to(ops.dtype), timer)[roles.uncond]
                            direction_from = starts[j - 1]
                            if band is not None:
                                uncond[..., band.rows[0]:band.rows[1], :] = start_bands.pop(direction_from)
                            direction = start_conds.pop(direction_from) - uncond
                            result.exchanges.append(index)
                        if index == start and band is not None and not last:
                            start_bands[start] = evaluate_band(latents, start)
                        cond = evaluate(latents, index)
                        timer.stop()
                        if index == start and not last:  # paired with the next exchange's uncond
                            start_conds[start] = cond
                        advance(reguide(cond, direction, spec.guidance_scale), index, direction_from)
                elif not last:
                    # the uncond rank: one evaluation (of its band) on the window start's latent, sent at the next
                    # window start
                    timer.start()
                    if band is None:
                        uncond = evaluate(latents, start)
                    else:
                        ours = evaluate_band(latents, start)
                        uncond = ours.new_zeros(latents.shape)
                        uncond[..., band.rows[0]:band.rows[1], :] = ours
                    latents = _swap(uncond, timer)[roles.cond]
                    result.exchanges.append(starts[j + 1])
                    timer.stop()
                    if on_step is not None:
                        on_step(starts[j + 1], steps)
    finally:
        if band is not None:
            band.leave()
            result.band_collectives = dict(band.comm.collectives - counted)
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
    """Measured compute per step -> speeds; rank 0 re-plans the plan's strategy on both ranks; both adopt it.

    Any gain is taken (threshold 0): a new split of the branches, a new k or new bands move no state. The
    measured steps are whole-frame branch evaluations (warmup runs as cfg), whatever the bands."""
    x, t = sampler.scale(latents, warmup), sampler.timesteps[warmup]
    profiled = mine.profile_ms(x, t)
    measured = profiled if profiled is not None else statistics.median(timer.compute_ms()[:warmup])
    compiled = workspace.compiles(spec)
    whole = [r.model_copy(update={"rows": (0, plan.latent_height), "uncond_rows": None}) for r in plan.ranks]
    agreed = replan_together(ctx, spec, plan, measured, compiled_steps=compiled, compiled=compiled,
                             measured_on=plan.model_copy(update={"ranks": whole}), strategy=plan.strategy,
                             threshold=0.0)
    result.measured_speeds, result.predicted_gain = agreed.speeds, agreed.gain
    result.replanned, result.plan = agreed.plan is not None, agreed.plan or plan
    return result.plan
