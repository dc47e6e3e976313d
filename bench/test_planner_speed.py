"""Planner speed (issue 2 item 5: planning 64 candidate GPUs takes under 50 ms).

Each benchmark times one `stadi.planner.plan` call and asserts only that the plan is valid; the 50 ms target
is read from the benchmark statistics (see bench/README.md), never asserted on wall time. Without
--benchmark-enable (the project default) each body runs once, as a plain test.
"""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from stadi.api import Plan
from stadi.planner import Device, PlanRequest, plan
from stadi.planner.fidelity import ADMITS

PRODUCTS = ("H100", "A100-80GB", "L4", "T4")
NODES = 8
JOBS = {"sdxl-1024": ("sdxl", 1024), "sd3-2048": ("sd3", 2048)}


def mixed_pool(per_product: int) -> list[Device]:
    """`per_product` GPUs of each of H100, A100-80GB, L4 and T4 with loads 0-0.465, every speed distinct,
    spread round-robin over 8 nodes (so the link is the network). 8 GPUs are searched exhaustively
    (2^8 subsets); 64 GPUs by prefixes of the speed order (beyond 512 subsets)."""
    pool = []
    for p, product in enumerate(PRODUCTS):
        for i in range(per_product):
            n = p * per_product + i
            load = round((n * 7 % 10) * 0.05 + i * 0.001, 3)
            pool.append(Device(product, load=load, node=f"node-{n % NODES}", index=n))
    return pool


def check(result: Plan, request: PlanRequest, pool: list[Device]) -> None:
    """A runnable plan within the job's limits; not its time."""
    result.validate_for()
    assert request.gpus_min <= len(result.ranks) <= request.gpus_max
    assert len(result.ranks) + len(result.left_out) == len(pool)
    # the fastest strategy whose fidelity class the job's quality admits
    admitted = [s for s, f in result.alternative_fidelity.items() if f in ADMITS[request.quality]]
    assert result.fidelity in ADMITS[request.quality]
    assert result.predicted_seconds == min(result.alternatives[s] for s in admitted)


@pytest.mark.benchmark(group="planner")
@pytest.mark.parametrize("gpus", [64, 8], ids=["64gpus", "8gpus"])
@pytest.mark.parametrize("job", JOBS.values(), ids=JOBS.keys())
def test_plan_speed(benchmark: BenchmarkFixture, job: tuple[str, int], gpus: int) -> None:
    """Time of one auto plan: every strategy over the candidate GPU sets of a mixed pool."""
    family, side = job
    pool = mixed_pool(gpus // len(PRODUCTS))
    request = PlanRequest(family, side, side, steps=50, gpus_max=gpus)
    result = benchmark(plan, request, pool)
    check(result, request, pool)
