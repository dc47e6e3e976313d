"""One band's step inside the engine on one device, with the context of another band: the band wrappers, their
exchange buffers and the step graphs of a real ``Bands`` share, the other band's tensors looped back from ours.

One process measures what a rank's step computes (a window's local step reads the last exchange's context; a
window start also stages its fresh activations for the bucketed exchange): ``band_step_ms``. No collective
runs: a synchronous step copies our tensor into every band's rows, and the window exchange is not started. The
other band's rows hold our band's values, padded to the larger band; a step's cost depends on the shapes only.
Rank 0's band is the top one, so in a family whose bands share the text stream (Flux) it is the text band: its
step computes the text tokens too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from stadi_worker.engine.bands import Bands, Workspace
from stadi_worker.engine.comm import CommManager
from stadi_worker.engine.runtime import DistContext
from stadi_worker.engine.sampling import StepTimer, job_sampler

from stadi.api import DiffusionJobSpec, Plan


def loop_back(comm: CommManager) -> None:
    """Make ``comm`` exchange with itself: each synchronous layer copies its tensor into every band's rows, and a
    window start lays out its buffers but starts no exchange."""

    def gather_layer(slot: Any) -> None:
        for row in slot.rows:
            row.copy_(slot.send)

    def end_step() -> None:
        if comm._bucket is None:
            comm._build()
        comm._due = False

    comm._gather_layer = gather_layer  # type: ignore[method-assign]
    comm.end_step = end_step  # type: ignore[method-assign]


def band_step_ms(ops: Any, spec: DiffusionJobSpec, plan: Plan, workspace: Workspace, batch: int,
                 repeats: int = 20) -> dict[str, float]:
    """Median ms of rank 0's band step under ``plan`` (two bands) per phase: ``local`` (a step inside a window)
    and ``exchange`` (a window start: the same plus staging). ``batch`` 2 runs both guidance branches, 1 one."""
    times: dict[str, list[float]] = {}
    with band_share(ops, spec, plan, workspace, batch) as step:
        for phase in ("local", "exchange"):
            for _ in range(3):  # eager (and compile), capture, first replay
                step(phase)
            times[phase] = [_timed_ms(lambda phase=phase: step(phase), ops.device) for _ in range(repeats)]
    return {phase: statistics.median(t) for phase, t in times.items()}


def _timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


@contextmanager
def band_share(ops: Any, spec: DiffusionJobSpec, plan: Plan, workspace: Workspace,
               batch: int) -> Iterator[Callable[[str], torch.Tensor]]:
    """Rank 0's share of ``plan`` looped back, after its first (synchronous) step: yields ``step(phase)``, one
    band step of a fixed band latent and timestep in that phase (``local``, ``exchange`` or ``sync``)."""
    device = ops.device
    job = spec if batch == 2 else spec.model_copy(update={"guidance_scale": 1.0})
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device, backend="nccl")
    bands = Bands(ops, job, plan, ctx, workspace.graphs_for(device))
    bands.denoiser = workspace.step_denoiser(ops, job, banded=True)
    loop_back(bands.comm)
    with torch.no_grad():
        bands.enter(ops.encode(job, job.prompts[0], job.uses_cfg), StepTimer(device))
        try:
            sampler = job_sampler(ops, job)
            channels, _, width = ops.latent_shape(job)
            x = torch.randn(1, channels, bands.end - bands.start, width, generator=torch.Generator().manual_seed(0))
            x = x.to(device, ops.dtype)
            t = sampler.timesteps[job.steps // 2]

            def step(phase: str) -> torch.Tensor:
                bands.comm.begin_step(sync=phase == "sync", mode="local" if phase == "local" else "exchange")
                return bands.eps(x, t)

            step("sync")  # creates every slot, then the flat buffers
            yield step
        finally:
            bands.leave()
