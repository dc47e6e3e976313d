"""The sampling loop, written per rank: one scheduler instance per rank, the step index explicit.

Each rank visits a sub-grid of the base timesteps (docs/architecture.md, "Execution"): every base step during
warmup and a first short window, then every ``k``-th base step. The rank's private scheduler is set to that sub-grid, so
the step from ``t_i`` to ``t_{i+k}`` is one proper step of that size (for sigma schedulers the sub-grid's
sigmas are taken from the base grid; DDIM's step is computed from the sub-grid's alphas). The sub-grid always
ends on the base grid's final timestep.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from stadi.api import DiffusionJobSpec
from stadi_worker.models.base import ModelOps
from stadi_worker.models.schedulers import make_scheduler


def initial_noise(shape: tuple[int, int, int], seed: int, sigma: float) -> torch.Tensor:
    """The full initial latent (1, C, H, W), fp32, drawn on the CPU: identical on every rank and device."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=g, dtype=torch.float32) * sigma


def subgrid(steps: int, warmup: int, stride: int, period: int) -> list[int]:
    """Base indices a rank of ``stride`` visits: every step of warmup and of the first short window of
    ``(steps - warmup) % period`` steps (all ranks stride 1 there, so the full windows that follow end
    exactly on the last step), then every ``stride``-th step. ``period`` must be a multiple of ``stride``."""
    if period % stride:
        raise ValueError(f"period {period} is not a multiple of stride {stride}")
    warmup = min(max(warmup, 0), steps)
    lead = warmup + (steps - warmup) % period
    return list(range(lead)) + list(range(lead, steps, stride))


def is_boundary(index: int, steps: int, warmup: int, period: int) -> bool:
    """Whether every rank evaluates at base ``index`` after warmup (a window start: the exchange point)."""
    lead = warmup + (steps - warmup) % period
    return index >= warmup and (index < lead or (index - lead) % period == 0)


class BandSampler:
    """A private scheduler over ``steps`` base timesteps; ``grid`` picks the base indices this rank visits.

    ``scale``/``step`` take base indices; the scheduler itself is set to the sub-grid, so its own step
    counter is the position in ``grid``.
    """

    def __init__(self, scheduler: Any, steps: int, device: torch.device, grid: Sequence[int] | None = None,
                 timestep_kwargs: dict[str, Any] | None = None):
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(steps, device=device, **(timestep_kwargs or {}))
        self.steps = steps
        self.timesteps = self.scheduler.timesteps.clone()  # the base grid, indexed by base index
        sigmas = getattr(self.scheduler, "sigmas", None)
        self._base_sigmas = sigmas.clone() if isinstance(sigmas, torch.Tensor) else None
        # DDIM derives the previous timestep from num_inference_steps instead of reading a grid
        self.ddim = type(self.scheduler).__name__ == "DDIMScheduler"
        if not self.ddim and (self._base_sigmas is None or len(self._base_sigmas) != steps + 1):
            raise NotImplementedError(f"{type(self.scheduler).__name__}: no strided sub-grid support")
        self.grid: list[int] = list(range(steps))
        self._pos = {i: i for i in self.grid}
        if grid is not None:
            self.set_grid(grid)

    def set_grid(self, grid: Sequence[int]) -> None:
        """Visit ``grid`` (increasing base indices from 0) from now on; already visited indices must agree."""
        grid = list(grid)
        if not grid or grid[0] != 0 or any(b <= a for a, b in itertools.pairwise(grid)) \
                or grid[-1] >= self.steps:
            raise ValueError(f"bad sub-grid {grid} of {self.steps} steps")
        self.grid = grid
        self._pos = {i: n for n, i in enumerate(grid)}
        if self.ddim:
            return
        s = self.scheduler
        idx = torch.tensor(grid, dtype=torch.long)
        s.timesteps = self.timesteps[idx.to(self.timesteps.device)]
        assert self._base_sigmas is not None
        ends = torch.tensor([*grid, self.steps], dtype=torch.long)
        s.sigmas = self._base_sigmas[ends.to(self._base_sigmas.device)]  # last: the base final sigma
        s.num_inference_steps = len(grid)

    def next_index(self, index: int) -> int:
        """The base index the step at ``index`` lands on (``steps`` = the final timestep)."""
        n = self._pos[index]
        return self.grid[n + 1] if n + 1 < len(self.grid) else self.steps

    @property
    def init_noise_sigma(self) -> float:
        return float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    def _at(self, index: int) -> None:
        # schedulers that keep a step counter (Euler, DPM-Solver, flow matching) read it in step() and
        # scale_model_input(); pin it so that our position, not the call count, decides
        if hasattr(self.scheduler, "_step_index"):
            self.scheduler._step_index = index if self.ddim else self._pos[index]

    def scale(self, x: torch.Tensor, index: int) -> torch.Tensor:
        self._at(index)
        if hasattr(self.scheduler, "scale_model_input"):
            return self.scheduler.scale_model_input(x, self.timesteps[index])
        return x

    def step(self, eps: torch.Tensor, index: int, x: torch.Tensor) -> torch.Tensor:
        self._at(index)
        nxt = self.next_index(index)
        if self.ddim and nxt != index + 1:
            return self._ddim_step(eps, index, nxt, x)
        return self.scheduler.step(eps, self.timesteps[index], x, return_dict=False)[0]

    def _ddim_step(self, eps: torch.Tensor, index: int, nxt: int, x: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta 0) from base ``index`` straight to base ``nxt``: diffusers' formula with
        the sub-grid's previous timestep instead of ``t - num_train_timesteps // steps``."""
        s = self.scheduler
        t = int(self.timesteps[index])
        if nxt < self.steps:
            prev = int(self.timesteps[nxt])
        else:  # the base grid's own final target
            prev = int(self.timesteps[-1]) - s.config.num_train_timesteps // s.num_inference_steps
        a_t = s.alphas_cumprod[t]
        a_prev = s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod
        b_t = 1 - a_t
        kind = s.config.prediction_type
        if kind == "epsilon":
            x0, e = (x - b_t.sqrt() * eps) / a_t.sqrt(), eps
        elif kind == "sample":
            x0 = eps
            e = (x - a_t.sqrt() * x0) / b_t.sqrt()
        elif kind == "v_prediction":
            x0 = a_t.sqrt() * x - b_t.sqrt() * eps
            e = a_t.sqrt() * eps + b_t.sqrt() * x
        else:
            raise ValueError(f"DDIM prediction_type {kind!r} is not supported")
        if s.config.thresholding:
            x0 = s._threshold_sample(x0)
        elif s.config.clip_sample:
            x0 = x0.clamp(-s.config.clip_sample_range, s.config.clip_sample_range)
        return (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e).to(x.dtype)

    def map_state(self, fn: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> None:
        """Apply ``fn`` to every tensor of the scheduler's state shaped like the band ``like`` (DPM-Solver's
        history of model outputs): used when bands are re-cut after the re-plan."""
        for name, value in list(vars(self.scheduler).items()):
            if isinstance(value, torch.Tensor) and value.shape == like.shape:
                setattr(self.scheduler, name, fn(value))
            elif isinstance(value, list) and any(isinstance(v, torch.Tensor) and v.shape == like.shape
                                                 for v in value):
                setattr(self.scheduler, name, [fn(v) if isinstance(v, torch.Tensor) and v.shape == like.shape
                                               else v for v in value])


def job_sampler(ops: ModelOps, spec: DiffusionJobSpec) -> BandSampler:
    """The base grid of ``spec``'s sampler for a family's pipeline, with the family's timestep arguments."""
    return BandSampler(make_scheduler(ops, spec.scheduler), spec.steps, ops.device,
                       timestep_kwargs=ops.timestep_kwargs(spec))


class StepTimer:
    """Per-step wall time of the denoiser, and the time it spent blocked in collectives (so compute can be
    told from waiting for a slower peer): CUDA events on a GPU (read at the end), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[Any] = []
        self._waits: list[list[Any]] = []

    def _mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _span(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def start(self) -> None:
        self._marks.append([self._mark(), None])
        self._waits.append([])

    def stop(self) -> None:
        self._marks[-1][1] = self._mark()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Time spent inside is waiting on peers, not compute (ignored outside a step)."""
        if not self._marks or self._marks[-1][1] is not None:
            yield
            return
        a = self._mark()
        try:
            yield
        finally:
            self._waits[-1].append((a, self._mark()))

    def running_compute_ms(self) -> float:
        """CPU only: compute time of the step in progress so far (its wall time less its waits)."""
        if self.cuda:
            raise RuntimeError("running_compute_ms reads host clocks; CUDA steps are timed with events")
        start = self._marks[-1][0]
        return max((time.perf_counter() - start) * 1e3 - sum(self._span(a, b) for a, b in self._waits[-1]), 0.0)

    def ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
        return [self._span(a, b) for a, b in self._marks]

    def compute_ms(self) -> list[float]:
        """Per step: wall time minus the time blocked in collectives."""
        walls = self.ms()
        return [max(w - sum(self._span(a, b) for a, b in waits), 1e-6)
                for w, waits in zip(walls, self._waits, strict=True)]


EpsFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# Called after each denoiser step with its compute time so far (``StepTimer.running_compute_ms``): how a test or a
# benchmark makes a CPU rank look slower (``stadi_worker.cli.emulate``); the engine itself never slows down.
Pace = Callable[[float], None]


def denoise_loop(sampler: BandSampler, latents: torch.Tensor, eps_fn: EpsFn, timer: StepTimer,
                 on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run ``sampler``'s grid on ``latents`` (a band or the full frame); ``eps_fn(x, t, index)`` returns the
    guided noise prediction for ``x``. Schedulers act elementwise, so a band steps on its own."""
    total = len(sampler.grid)
    with torch.no_grad():
        for n, index in enumerate(sampler.grid):
            x_in = sampler.scale(latents, index)
            timer.start()
            eps = eps_fn(x_in, sampler.timesteps[index], index)
            timer.stop()
            latents = sampler.step(eps, index, latents)
            if on_step is not None:
                on_step(n + 1, total)
    return latents
