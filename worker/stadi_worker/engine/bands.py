"""One rank's share of the work under a plan (``Bands``), and what a loaded pipeline keeps across images
(``Workspace``): the band wrappers, exchange buffers and process groups of every plan it ran, and the CUDA
graphs of their steps. Building these once per plan, not once per image, is what lets the second image of
a plan replay graphs instead of capturing them again.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from stadi.api import DiffusionJobSpec, Plan
from stadi_worker.engine.comm import BandLayout, CommManager, all_gather_uneven
from stadi_worker.engine.graphs import StepGraphs
from stadi_worker.engine.layers import DenoiserPatch
from stadi_worker.engine.options import EngineOptions
from stadi_worker.engine.runtime import DistContext, hold_idle
from stadi_worker.engine.sampling import StepTimer
from stadi_worker.models.base import Branches, ModelOps, batch_branches


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance."""
    return uncond + scale * (cond - uncond)


def _groups(plan: Plan, rank: int) -> tuple[list[int], Any, Any]:
    """(the ranks that split the height with us, their process group, the group of every active rank); a
    group of None is the world. An idle rank gets the ranks whose bands make up the final latent.

    new_group is collective over the world: every rank, idle ones too, creates the same subgroups in the
    same order."""
    active = plan.active
    every = dist.new_group([r.rank for r in active]) if len(active) < plan.world_size else None
    if all(r.branch == "both" for r in active):
        return [r.rank for r in active], every, every
    members = {b: [r.rank for r in active if r.branch == b] for b in ("cond", "uncond")}
    groups = {b: dist.new_group(members[b]) for b in ("cond", "uncond")}
    mine = "cond" if plan.ranks[rank].idle else plan.ranks[rank].branch
    return members[mine], groups[mine], every


def assemble(parts: Mapping[int, torch.Tensor], plan: Plan, ranks: list[int]) -> torch.Tensor:
    """Full-height tensor from the bands of ``ranks`` (``parts`` by world rank), top to bottom."""
    ranks = sorted(ranks, key=lambda r: plan.ranks[r].rows[0])
    return torch.cat([parts[r] for r in ranks], dim=-2)


class Bands:
    """This rank's share under one plan: its band, its group, the comm manager and the band wrappers.

    An idle rank's share is the empty band: it runs no step, only the final ``gather_full``."""

    def __init__(self, ops: ModelOps, spec: DiffusionJobSpec, plan: Plan, ctx: DistContext, graphs: StepGraphs):
        self.ops, self.spec, self.plan, self.ctx, self.graphs = ops, spec, plan, ctx, graphs
        self.denoiser: Any = None  # the denoiser of our steps (compiled, when asked), or None: the pipeline's
        self.guidance = spec.uses_cfg
        me = plan.ranks[ctx.rank]
        self.idle = me.idle
        self.split = not me.idle and me.branch != "both"
        self.members, group, self.active_group = _groups(plan, ctx.rank)
        self.active = [r.rank for r in plan.active]
        # names this plan's image ends in the rendezvous store alike on every rank (the plan is broadcast)
        self._fingerprint = hashlib.sha1(plan.model_dump_json().encode()).hexdigest()[:12]
        self._images = 0
        self.active_rows = [r.height for r in plan.active]
        texts = [i for i, r in enumerate(self.members) if plan.computes_text(r)]
        layout = (BandLayout(bands=(me.rows,), index=0, height=plan.latent_height) if me.idle else
                  BandLayout(bands=tuple(plan.ranks[r].rows for r in self.members),
                             index=self.members.index(ctx.rank), height=plan.latent_height,
                             text=texts[0] if len(texts) == 1 < len(self.members) else None))
        # a rank whose stride is below the period steps alone inside windows: it keeps their extrapolated context
        self.comm = CommManager(layout=layout, group=group, local_steps=me.stride < plan.sync_period)
        self.order = [me.branch] if self.split else (["uncond", "cond"] if self.guidance else ["cond"])
        self.start, self.end = me.rows
        self.world_rows = [r.height for r in plan.ranks]
        self.patch = DenoiserPatch(ops.denoiser, self.comm)
        self.timer: StepTimer | None = None
        self._cond_keys: list[str] = []
        self._cond: list[torch.Tensor] = []

    def enter(self, branches: Branches, timer: StepTimer) -> None:
        """Use this share for one image: its prompt's conditioning, its step timer, the band wrappers."""
        cond = batch_branches(branches, self.order)
        self._cond_keys, self._cond = list(cond), list(cond.values())
        self.timer = timer
        self.comm.waiting = timer.waiting
        if self.banded:
            self.patch.apply()

    def leave(self) -> None:
        if self.banded:
            self.patch.restore()
        self.comm.settle()  # the last window's exchange: nothing may be in flight when the share or image ends

    @property
    def banded(self) -> bool:
        """Whether we split the height with other ranks (else the band wrappers would only pass through)."""
        return self.comm.size > 1

    @property
    def phase(self) -> str:
        return "sync" if self.comm.sync else ("local" if self.comm.local else "exchange")

    def _forward(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        out = self.ops(torch.cat([x] * len(self.order)), t, dict(zip(self._cond_keys, cond, strict=True)),
                       denoiser=self.denoiser)
        if not self.split and self.guidance:
            return guide(*out.chunk(2), self.spec.guidance_scale)
        return out

    def _key(self) -> Hashable:
        return id(self), self.phase if self.banded else "whole"

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided noise prediction for our band ``x`` (one graph replay per step on a GPU)."""
        out = self.graphs.run(self._key(), self._forward, x, t, *self._cond)
        self.comm.end_step()  # outside the graph: a window start's exchange is launched eagerly, never replayed
        if not self.split:
            return out
        # condition split: every rank needs the other branch's prediction for its rows; predictions are
        # small (latent channels only), so all ranks gather both full frames and cut out their band
        assert self.timer is not None
        plan = self.plan
        with self.timer.waiting():
            _, recv, trim = all_gather_uneven(out, self.active_rows, dim=-2, group=self.active_group,
                                              backend=self.ctx.backend)
            parts = dict(zip(self.active, trim(recv), strict=True))
        branch = {b: assemble(parts, plan, [r.rank for r in plan.active if r.branch == b])
                  for b in ("uncond", "cond")}
        return guide(branch["uncond"], branch["cond"], self.spec.guidance_scale)[..., self.start:self.end, :]

    def profile_ms(self, x: torch.Tensor, t: torch.Tensor, repeats: int = 2) -> float | None:
        """Compute time of one of our band steps with no peer to wait for (a local step on the last
        exchange's context, output discarded), for the re-plan on a GPU, where a synchronous warmup step
        replayed as a graph cannot tell computing from waiting. None where no band exchange exists."""
        if self.comm.size == 1 or not self.graphs.enabled:
            return None
        self.comm.begin_step(sync=False, mode="local")
        key = self._key()
        while not self.graphs.captured(key, x, t, *self._cond):
            self.graphs.run(key, self._forward, x, t, *self._cond)
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            self.graphs.run(key, self._forward, x, t, *self._cond)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    def hold_idle(self) -> None:
        """Before the final gather of an image under a plan with idle ranks: the idle ones wait until the
        first active rank is done (``runtime.hold_idle``), so they never sit in a collective for a whole image."""
        if len(self.active) == self.ctx.world_size:
            return
        key = f"stadi/image-end/{self._fingerprint}/{self._images}"
        self._images += 1
        hold_idle(self.ctx, key, idle=self.idle, announce=self.ctx.rank == self.active[0])

    def gather_full(self, band: torch.Tensor) -> torch.Tensor:
        """The full-height tensor from every rank's band (collective over the world: idle ranks send their
        empty band, and get the full tensor like the others)."""
        _, recv, trim = all_gather_uneven(band.contiguous(), self.world_rows, dim=-2, backend=self.ctx.backend)
        return assemble(dict(enumerate(trim(recv))), self.plan, self.members)


def _plan_key(plan: Plan) -> Hashable:
    return plan.latent_height, plan.latent_width, tuple((r.rows, r.branch) for r in plan.ranks)


@dataclass(frozen=True)
class RecompileBudget:
    """A compiled banded denoiser, called with dynamo's recompile limits raised to ``limit``. A banded step breaks
    its graph at every exchange, so each wrapped layer (its comm key a constant of the frame) and each resumed
    frame of a differently shaped block compiles on its own: SDXL's UNet needs far more than dynamo's default of
    8 per code object, and past it the rest ran eagerly (one H200: compiled bands 0.94 of the graph's time
    against SD3's 0.80). One compile per module of the denoiser bounds it."""

    compiled: Any
    limit: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(recompile_limit=self.limit, accumulated_recompile_limit=self.limit):
            return self.compiled(*args, **kwargs)


@dataclass
class Workspace:
    """What one loaded pipeline keeps on one rank across images: ``Bands`` per plan and the step graphs.

    Pass the same workspace to every ``generate`` call of a pipeline (a job, a benchmark); a workspace
    belongs to one pipeline and one process group."""

    options: EngineOptions = field(default_factory=EngineOptions)
    graphs: StepGraphs | None = None
    _bands: dict[Hashable, Bands] = field(default_factory=dict)
    _compiled: dict[tuple[int, bool], Any] = field(default_factory=dict)
    _kept: dict[Hashable, Any] = field(default_factory=dict)

    def keep(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """What a strategy keeps across images under ``key`` (its band wrappers and buffers), built on first use
        (collectively where ``build`` is: every rank asks for the same keys in the same order)."""
        if key not in self._kept:
            self._kept[key] = build()
        return self._kept[key]

    def compiles(self, spec: DiffusionJobSpec) -> bool:
        """Whether the steps of ``spec`` run compiled here (the job's ask, or the options' override)."""
        return self.options.compile_backend(spec.model.compile) is not None

    def step_denoiser(self, ops: ModelOps, spec: DiffusionJobSpec, banded: bool = False) -> Any:
        """The denoiser of our steps, compiled once per pipeline and kind when the job (or the options) ask for
        it, else None (the pipeline's). Whole-frame steps compile for their one shape; banded steps compile with
        dynamic shapes, so one compile serves every band height (a re-plan re-cuts the bands); their exchanges
        are graph breaks (``CommManager`` is not traced)."""
        backend = self.options.compile_backend(spec.model.compile)
        if backend is None:
            return None
        key = (id(ops.denoiser), banded)
        if key not in self._compiled:
            compiled = torch.compile(ops.denoiser, backend=backend, dynamic=banded)
            self._compiled[key] = RecompileBudget(compiled, sum(1 for _ in ops.denoiser.modules())) if banded \
                else compiled
        return self._compiled[key]

    def graphs_for(self, device: torch.device) -> StepGraphs:
        if self.graphs is None:
            self.graphs = StepGraphs(enabled=self.options.graphs_on(device))
        return self.graphs

    def close(self) -> None:
        """Release the graphs and every plan's buffers (before the process group goes)."""
        if self.graphs is not None:
            self.graphs.close()
        self._bands.clear()
        self._compiled.clear()
        self._kept.clear()

    def bands(self, ops: ModelOps, spec: DiffusionJobSpec, plan: Plan, ctx: DistContext) -> Bands:
        """The share of this rank under ``plan``, built on first use (collectively: every rank asks for the
        same plans in the same order, as the plan is broadcast)."""
        key = (id(ops.denoiser), _plan_key(plan), spec.guidance_scale, spec.uses_cfg)
        found = self._bands.get(key)
        if found is None:
            found = self._bands[key] = Bands(ops, spec, plan, ctx, self.graphs_for(ctx.device))
            found.denoiser = self.step_denoiser(ops, spec, banded=found.banded)
        return found
