"""The sampling loop, written per rank: one scheduler instance per rank, the step index explicit.

A later issue gives each rank its own strided sub-grid of timesteps; the loop already takes the grid as a
list of indices into the scheduler's timesteps and tells the scheduler which index it stands on.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


class BandSampler:
    """A private scheduler over ``steps`` timesteps; ``grid`` picks the indices this rank visits."""

    def __init__(self, scheduler: Any, steps: int, device: torch.device, grid: Sequence[int] | None = None):
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(steps, device=device)
        self.timesteps = self.scheduler.timesteps
        self.grid = list(grid) if grid is not None else list(range(len(self.timesteps)))

    @property
    def init_noise_sigma(self) -> float:
        return float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    def _at(self, index: int) -> None:
        # schedulers that keep a step counter (Euler, DPM-Solver, flow matching) read it in step() and
        # scale_model_input(); pin it so that the index, not the call count, decides
        if hasattr(self.scheduler, "_step_index"):
            self.scheduler._step_index = index

    def scale(self, x: torch.Tensor, index: int) -> torch.Tensor:
        self._at(index)
        if hasattr(self.scheduler, "scale_model_input"):
            return self.scheduler.scale_model_input(x, self.timesteps[index])
        return x

    def step(self, eps: torch.Tensor, index: int, x: torch.Tensor) -> torch.Tensor:
        self._at(index)
        return self.scheduler.step(eps, self.timesteps[index], x, return_dict=False)[0]


class StepTimer:
    """Per-step wall time of the denoiser: CUDA events on a GPU (read once at the end), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[Any] = []

    def start(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append([ev, None])
        else:
            self._marks.append([time.perf_counter(), None])

    def stop(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks[-1][1] = ev
        else:
            self._marks[-1][1] = time.perf_counter()

    def ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self._marks]
        return [(b - a) * 1e3 for a, b in self._marks]


EpsFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


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
