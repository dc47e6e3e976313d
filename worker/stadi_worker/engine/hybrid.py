"""Strategy ``hybrid`` on two ranks (arXiv 2602.21760): condition split with a pipeline window.

Both ranks keep the same full latent and take every step with the same guided prediction.
- Condition split: each rank runs its guidance branch (batch 1, full frame); the predictions are swapped
  (all_gather) and guided on both ranks. Rank 0 computes the relative discrepancy
  d_t = mean|eps_c - eps_u| / mean|eps_u| and broadcasts it, so both ranks hold the same history and take
  the same decision (``Switch``).
- Pipeline window (k steps): the stage-0 rank runs the first units of the denoiser on both branches
  (batch 2) and hands its output to the stage-1 rank, which runs the rest on the hand-over of the step
  before and sends back the guided prediction. The first window step fills the hand-over (stage 1 waits for
  this step's stage 0, so it is exact); the last one runs no stage 0 (nothing would read it). Stage 1 runs
  with the current step's timestep: only the activations are one step old.

On a GPU the denoiser calls (the split step's branch, each stage) replay as CUDA graphs of the caller's
workspace; every exchange runs eagerly between them. Stage 0 returns its hand-over flattened into one tensor
(a graph has one output; one send instead of one per skip), stage 1 cuts it back into views.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from stadi.api import DiffusionJobSpec, HybridPlan, Plan
from stadi.families import HybridSchedule
from stadi.planner.stage_split import Unit, balanced_boundary
from stadi_worker.engine.bands import Workspace
from stadi_worker.engine.replan import replan_together
from stadi_worker.engine.result import GenerationResult
from stadi_worker.engine.runtime import DistContext
from stadi_worker.engine.sampling import Pace, StepTimer, initial_noise, job_sampler
from stadi_worker.models import ops_for
from stadi_worker.models.base import StageSplit, batch_branches


@dataclass
class HybridResult(GenerationResult):
    modes: list[str] = field(default_factory=list)  # per step: "split" or "pipe"
    discrepancy: list[float] = field(default_factory=list)  # d_t of the split steps until the decision
    window: tuple[int, int] | None = None  # [start, end) of the pipeline window, when it ran
    boundary_layer: str | None = None  # first unit of stage 1 in this model, when the window ran


def slope(ds: Sequence[float], window: int) -> float | None:
    """How much d decreased per step over the last ``window`` steps; None until there are enough."""
    if len(ds) <= window:
        return None
    return (ds[-window - 1] - ds[-1]) / window


@dataclass
class Switch:
    """When the pipeline window runs: it starts after the first step whose slope is in [0, threshold), or
    at the cap step at the latest, and lasts ``pipeline_steps`` steps (cut at the last step)."""

    schedule: HybridPlan
    steps: int
    disabled: bool = False  # exact runs: condition split throughout
    ds: list[float] = field(default_factory=list)
    start: int | None = None

    @property
    def deciding(self) -> bool:
        return self.start is None and not self.disabled

    def record(self, index: int, d: float) -> None:
        """d_t of step ``index``; may start the window at the next step."""
        self.ds.append(d)
        s = slope(self.ds, self.schedule.window)
        if self.deciding and s is not None and 0.0 <= s < self.schedule.slope_threshold:
            self.start = index + 1

    def mode(self, index: int) -> str:
        """"pipe" inside the window, else "split" (called once per step, in order)."""
        if self.deciding and index >= self.schedule.cap_step:
            self.start = index
        if self.start is not None and not self.disabled and index in self.span:
            return "pipe"
        return "split"

    @property
    def span(self) -> range:
        if self.start is None:
            return range(0)
        return range(self.start, min(self.start + self.schedule.pipeline_steps, self.steps))


def switch_step(ds: Sequence[float], schedule: HybridPlan, steps: int) -> int | None:
    """The window start the rule gives for a recorded d_0, d_1, ... (None: no window within ``steps``)."""
    sw = Switch(schedule, steps)
    for index in range(steps):
        if sw.mode(index) == "pipe":
            return index
        if index < len(ds):
            sw.record(index, ds[index])
    return None


def resolve_cut(plan: Plan, units: Sequence[Unit]) -> tuple[int, int]:
    """(stage-0 rank, boundary in ``units``): the plan's cut when it indexes this model's units (the
    reference models), else the cut that balances this model's units at the plan's speeds (smaller
    models of the same family, as in tests)."""
    first = next(r for r in plan.ranks if r.layers is not None and r.layers[0] == 0)
    other = plan.ranks[1 - first.rank]
    boundary = first.layers[1]  # type: ignore[index]
    h = plan.hybrid
    assert h is not None
    if h.units != len(units) or units[boundary].name != h.boundary_layer:
        boundary = balanced_boundary(units, first.speed, other.speed)
    return first.rank, boundary


def restage_args(plan: Plan) -> dict[str, Any]:
    """How ``replan`` re-splits a hybrid plan at measured speeds (branches, stage roles and the cut may change):
    strategy hybrid with the plan's own schedule. A re-split moves no state (the window has not begun), so any
    gain is taken rather than only one above ``replanThreshold``."""
    h = plan.hybrid
    assert h is not None
    schedule = HybridSchedule(h.window, h.slope_threshold, h.pipeline_steps, h.cap_step)
    return {"threshold": 0.0, "strategy": "hybrid", "hybrid": schedule}


def _swap(send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], peer: int) -> None:
    """Point-to-point sends and receives with the other rank, batched so neither side blocks the other."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t in send]
    ops += [dist.P2POp(dist.irecv, t, peer) for t in recv]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _Runner:
    """One image under a hybrid plan on this rank."""

    def __init__(self, pipe: Any, spec: DiffusionJobSpec, plan: Plan, ctx: DistContext, prompt: str,
                 pace: Pace | None, exact: bool, workspace: Workspace):
        self.ops = ops_for(pipe, spec.model.family)
        self.spec, self.plan, self.ctx, self.pace = spec, plan, ctx, pace
        self.graphs = workspace.graphs_for(self.ops.device)
        with torch.no_grad():
            branches = self.ops.encode(spec, prompt, True)
        self.single = {b: batch_branches(branches, [b]) for b in ("uncond", "cond")}
        self.both = batch_branches(branches, ["uncond", "cond"])
        self.sampler = job_sampler(self.ops, spec)
        self.timer = StepTimer(self.ops.device)
        assert plan.hybrid is not None
        self.switch = Switch(plan.hybrid, spec.steps, disabled=exact)
        self.stages: StageSplit | None = None
        self.stage0 = 0
        self.carry: torch.Tensor | None = None  # stage 1: the flat hand-over buffer of the window
        self.handover: list[tuple[int, ...]] = []  # the hand-over's shapes in this window
        self.peer = 1 - ctx.rank
        self.shape = self.ops.latent_shape(spec)

    def _pace(self) -> None:
        if self.pace is not None:  # CPU only: the running compute time reads host clocks
            self.pace(self.timer.running_compute_ms())

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return uncond + self.spec.guidance_scale * (cond - uncond)

    def split(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """One condition-split step: our branch, swapped; rank 0's d_t broadcast while deciding."""
        branch = self.plan.ranks[self.ctx.rank].branch
        cond = self.single[branch]
        keys = list(cond)

        def forward(x: torch.Tensor, t: torch.Tensor, *c: torch.Tensor) -> torch.Tensor:
            return self.ops(x, t, dict(zip(keys, c, strict=True)))

        key = ("hybrid-split", id(self.ops.denoiser), branch)
        out = self.graphs.run(key, forward, x, self.sampler.timesteps[index], *cond.values())
        self._pace()
        parts = [torch.empty_like(out) for _ in range(2)]
        with self.timer.waiting():
            dist.all_gather(parts, out.contiguous())
        by_branch = {r.branch: parts[r.rank] for r in self.plan.ranks}
        uncond, cond = by_branch["uncond"], by_branch["cond"]
        if self.switch.deciding:  # after the exchange: the decision needs a host value once per step
            c, u = cond.float(), uncond.float()
            box = ((c - u).abs().mean() / u.abs().mean()).double().reshape(1)
            with self.timer.waiting():
                dist.broadcast(box, src=0)
            self.switch.record(index, float(box.item()))
        return self.guide(uncond, cond)

    def pipe(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """One pipeline step; the window's first step fills the hand-over, its last runs no stage 0."""
        span = self.switch.span
        fill, last = index == span.start, index == span[-1]
        if fill:
            self._begin_window()
        assert self.stages is not None
        t = self.sampler.timesteps[index]
        if self.ctx.rank == self.stage0:
            eps = torch.empty((1, *self.shape), device=self.ops.device, dtype=self.ops.dtype)
            carry = [self._first(x, t)] if fill or not last else []
            self._pace()
            with self.timer.waiting():
                if fill:
                    self._handover_shapes(self.graphs.notes[self._stage_key(0)])
                    _swap(carry, [], self.peer)
                    _swap([], [eps], self.peer)
                else:
                    _swap(carry, [eps], self.peer)
            return eps
        if fill:
            with self.timer.waiting():
                self._handover_shapes(None)
                _swap([], [self.carry], self.peer)
        assert self.carry is not None
        eps = self._second(self.carry, t)
        self._pace()
        with self.timer.waiting():
            _swap([eps], [] if fill or last else [self.carry], self.peer)
        return eps

    def _stage_key(self, stage: int) -> Hashable:
        """Names a stage function's graph: the model, the cut, the latent shape and (stage 1) the guidance."""
        assert self.stages is not None
        key = ("hybrid-stage0", id(self.ops.denoiser), self.stages.boundary, self.shape)
        return key if stage == 0 else ("hybrid-stage1", *key[1:], self.spec.guidance_scale)

    def _first(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Stage 0 on both branches: the flat hand-over."""
        stages, keys, key = self.stages, list(self.both), self._stage_key(0)
        assert stages is not None

        def forward(x: torch.Tensor, t: torch.Tensor, *c: torch.Tensor) -> torch.Tensor:
            carry = stages.first(torch.cat([x, x]), t, dict(zip(keys, c, strict=True)))
            # a replay runs no Python: the hand-over's shapes (a function of the key) are noted for it
            self.graphs.notes[key] = [tuple(h.shape) for h in carry]
            return torch.cat([h.reshape(-1) for h in carry])

        return self.graphs.run(key, forward, x, t, *self.both.values())

    def _second(self, flat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Stage 1 on a flat hand-over: the guided prediction."""
        stages, keys, shapes = self.stages, list(self.both), self.handover
        assert stages is not None

        def forward(flat: torch.Tensor, t: torch.Tensor, *c: torch.Tensor) -> torch.Tensor:
            parts = flat.split([math.prod(s) for s in shapes])
            carry = tuple(p.view(s) for p, s in zip(parts, shapes, strict=True))
            return self.guide(*stages.second(carry, t, dict(zip(keys, c, strict=True))).chunk(2))

        return self.graphs.run(self._stage_key(1), forward, flat, t, *self.both.values())

    def _begin_window(self) -> None:
        units = self.ops.units(self.shape[1], self.shape[2])
        self.stage0, boundary = resolve_cut(self.plan, units)
        self.stages = self.ops.stages(self.shape[1], self.shape[2], boundary)

    def _handover_shapes(self, shapes: list[tuple[int, ...]] | None) -> None:
        """Stage 0 tells stage 1 the hand-over's shapes once per window; stage 1 allocates its flat buffer
        (received into at every step, copied into the graph by ``run``)."""
        box: list[Any] = [shapes]
        dist.broadcast_object_list(box, src=self.stage0,
                                   device=self.ctx.device if self.ctx.backend == "nccl" else None)
        self.handover = box[0]
        if shapes is None:
            numel = sum(math.prod(s) for s in self.handover)
            self.carry = torch.empty(numel, device=self.ops.device, dtype=self.ops.dtype)


def generate_hybrid(pipe: Any, spec: DiffusionJobSpec, plan: Plan, ctx: DistContext, prompt: str, seed: int, *,
                    exact: bool = False, on_step: Callable[[int, int], None] | None = None,
                    replan_after_warmup: bool = False, on_replan: Callable[[GenerationResult], None] | None = None,
                    pace: Pace | None = None, decode: bool = True,
                    workspace: Workspace | None = None) -> HybridResult:
    """Generate one image under a hybrid ``plan``; call on both ranks. ``exact`` keeps the condition split
    throughout (unified CFG). With ``replan_after_warmup`` the first ``plan.warmup_steps`` steps are timed
    and the stages may be re-split by measured speed before the window. The denoiser calls run through the
    step graphs of ``workspace`` (pass one per pipeline, as to ``generate``); ``pace`` as ``generate``'s."""
    run = _Runner(pipe, spec, plan, ctx, prompt, pace, exact, workspace or Workspace())
    sampler, timer, ops = run.sampler, run.timer, run.ops
    latents = initial_noise(run.shape, seed, sampler.init_noise_sigma).to(ops.device, ops.dtype)
    result = HybridResult(image=None, latents=None, step_ms=[], plan=plan)
    warmup = min(plan.warmup_steps, spec.steps)
    with torch.no_grad():
        for index in range(spec.steps):
            if replan_after_warmup and index == warmup > 0 and run.stages is None:
                _replan(run, result, warmup)
                if on_replan is not None and ctx.rank == 0:
                    on_replan(result)
            mode = run.switch.mode(index)
            x = sampler.scale(latents, index)
            timer.start()
            eps = run.pipe(index, x) if mode == "pipe" else run.split(index, x)
            timer.stop()
            latents = sampler.step(eps, index, latents)
            result.modes.append(mode)
            if on_step is not None:
                on_step(index + 1, spec.steps)
    result.step_ms = timer.ms()
    result.wait_ms = [max(w - c, 0.0) for w, c in zip(result.step_ms, timer.compute_ms(), strict=True)]
    result.evals, result.exchanges = list(range(spec.steps)), list(range(spec.steps))
    result.discrepancy = list(run.switch.ds)
    if run.stages is not None:
        span = run.switch.span
        result.window = (span.start, span.stop)
        result.boundary_layer = run.stages.units[run.stages.boundary].name
    if ctx.rank == 0:  # both ranks hold the same latent
        result.latents = latents
        result.image = ops.decode(latents) if decode else None
    return result


def _replan(run: _Runner, result: HybridResult, warmup: int) -> None:
    """Warmup compute medians -> speeds on both ranks; rank 0 re-splits; both adopt its answer."""
    median = statistics.median(run.timer.compute_ms()[:warmup])
    agreed = replan_together(run.ctx, run.spec, run.plan, median, **restage_args(run.plan))
    run.plan = agreed.plan or run.plan
    result.measured_speeds, result.predicted_gain = agreed.speeds, agreed.gain
    result.replanned, result.plan = agreed.plan is not None, run.plan
