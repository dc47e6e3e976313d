"""Per-rank scheduler sub-grids (docs/architecture.md, "Execution"): every stride's grid ends on the final timestep and
takes one proper step per sub-grid interval, for DDIM, Euler, DPM-Solver++ 2M and FlowMatch-Euler."""

from __future__ import annotations

import pytest
import torch
from stadi_worker.cli.emulate import parse_slowdown, slowdown_factor
from stadi_worker.engine.sampling import BandSampler, is_boundary, subgrid

STEPS, WARMUP = 10, 2


def _scheduler(name: str):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    return {"ddim": lambda: DDIMScheduler(steps_offset=1),
            "euler": lambda: EulerDiscreteScheduler(timestep_spacing="trailing"),
            "dpmpp-2m": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2),
            "flow-euler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)}[name]()


def _noise_level(sampler: BandSampler) -> tuple[float, float]:
    """(signal, noise) coefficients of x = signal * x0 + noise * n at the grid's first point."""
    s = sampler.scheduler
    if sampler.ddim:
        a = float(s.alphas_cumprod[int(sampler.timesteps[0])])
        return a**0.5, (1 - a) ** 0.5
    sigma = float(s.sigmas[0])
    name = type(s).__name__
    if name.startswith("FlowMatch"):
        return 1 - sigma, sigma
    if name.startswith("DPMSolver"):
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha
    return 1.0, sigma  # Euler: x = x0 + sigma * n


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp-2m", "flow-euler"])
@pytest.mark.parametrize(("stride", "period"), [(1, 1), (2, 2), (3, 3), (4, 4), (2, 6), (3, 6)])
def test_subgrid_ends_on_final_timestep(name: str, stride: int, period: int) -> None:
    # A model that predicts the true noise n of a clean image x0 = 0 keeps every exact sampler on the path
    # x = noise(t) * n, whatever the step sizes: the result is the final level's noise, which is 0 (or
    # DDIM's final alpha), and a grid that stopped short of the final timestep would leave noise behind.
    grid = subgrid(STEPS, WARMUP, stride, period)
    assert grid[-1] + stride == STEPS
    assert len(grid) == WARMUP + (STEPS - WARMUP) % period + (STEPS - WARMUP) // period * (period // stride)
    sampler = BandSampler(_scheduler(name), STEPS, torch.device("cpu"))
    _, noise0 = _noise_level(sampler)
    sampler.set_grid(grid)
    n = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise0 * n
    for index in grid:
        sampler.scale(x, index)
        x = sampler.step(n.clone(), index, x)
    assert sampler.next_index(grid[-1]) == STEPS
    expected = 0.0
    if sampler.ddim:
        expected = float(1 - sampler.scheduler.final_alpha_cumprod) ** 0.5
    err = float((x - expected * n).abs().max())
    assert err < 1e-4, f"{name} stride {stride}: off the final level by {err}"


def test_ddim_stride_one_matches_scheduler() -> None:
    sampler = BandSampler(_scheduler("ddim"), STEPS, torch.device("cpu"))
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    ours = sampler._ddim_step(eps, 3, 4, x)
    ref = sampler.scheduler.step(eps, sampler.timesteps[3], x, return_dict=False)[0]
    assert float((ours - ref).abs().max()) < 1e-5


def test_boundaries_and_short_first_window() -> None:
    # T - W = 7 with P = 2: one short window of 1 step (every rank), then 3 windows of 2
    assert subgrid(9, 2, 2, 2) == [0, 1, 2, 3, 5, 7]
    assert [i for i in range(9) if is_boundary(i, 9, 2, 2)] == [2, 3, 5, 7]
    with pytest.raises(ValueError):
        subgrid(8, 2, 2, 3)


def test_parse_slowdown() -> None:
    assert parse_slowdown("1=3.0, 2=1.5") == {1: 3.0, 2: 1.5}
    assert slowdown_factor(0, "1=3") == 1.0 and slowdown_factor(1, "1=3") == 3.0
    for bad in ("1", "x=2", "1=0.5", "-1=2"):
        with pytest.raises(ValueError):
            parse_slowdown(bad)
