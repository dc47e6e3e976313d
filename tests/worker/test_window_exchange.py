"""One exchange per window (docs/architecture.md, "Execution"), on 2 Gloo ranks: counted by the ``CommManager``
on a tiny SDXL (a synchronous step runs one blocking all_gather per wrapped layer; a window start runs none of its
own and launches exactly one bucketed all_gather after it; a local step inside a window launches nothing), and
what each step reads, eager and under ``torch.compile``, on layers of known values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from conftest import job_spec, launch_ranks, make_plan

WARMUP = 2
# strides -> steps: (1, 2) over 9 steps leaves a remainder window of one step (both ranks) before the full ones
RUNS = {(1, 2): 9, (1, 3): 8}


def _plan(strides: tuple[int, int], steps: int) -> dict[str, Any]:
    doc = make_plan("sdxl", [(0, 4), (4, 16)], warmup=WARMUP, steps=steps, strategy="stadi")
    for r, k in zip(doc["ranks"], strides, strict=True):
        r["stride"] = k
    doc["sync_period"] = math.lcm(*strides)
    return doc


@pytest.fixture(scope="module")
def counted(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tiny_dir("sdxl")
    runs = [{"name": f"s{a}{b}", "plan": _plan((a, b), steps), "steps": steps} for (a, b), steps in RUNS.items()]
    runs.append({"name": "exact", "plan": _plan((1, 1), 8), "steps": 8, "exact": True})
    cfg = {"spec": job_spec("sdxl"), "prompt": "a red bicycle in the snow", "seed": 3, "cache_dir": str(model_cache),
           "runs": runs, "schedule": True}
    return launch_ranks(2, cfg, tmp_path_factory.mktemp("window-exchange"), module="exchange_runs").check()


def _per_step(rank: dict[str, Any]) -> list[tuple[int, dict[str, int]]]:
    """(base index, collectives launched in that step) for every step of a rank."""
    before: dict[str, int] = {}
    out = []
    for index, after in zip(rank["evals"], rank["counts"], strict=True):
        out.append((index, {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}))
        before = after
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strides", sorted(RUNS))
def test_one_bucketed_collective_per_window_start(counted: Any, strides: tuple[int, int]) -> None:
    res = counted.result(f"s{strides[0]}{strides[1]}")
    steps, period = RUNS[strides], math.lcm(*strides)
    remainder = (steps - WARMUP) % period
    starts = list(range(WARMUP, WARMUP + remainder)) + list(range(WARMUP + remainder, steps, period))
    fast, slow = res["ranks"]
    assert fast["exchanges"] == slow["exchanges"] == list(range(WARMUP)) + starts
    assert fast["evals"] == list(range(steps)) and slow["evals"] == list(range(WARMUP)) + starts
    for rank in res["ranks"]:
        layers = rank["slots"]
        assert layers > 20 and rank["window_bytes"] > 0
        for index, launched in _per_step(rank):
            if index < WARMUP:
                assert launched == {"layer": layers}, index  # every layer waits for every band's fresh tensor
            elif index in starts:
                assert launched == {"window": 1}, index
            else:
                assert launched == {}, index  # a local step: the fast rank runs alone
        # nothing is launched after the last step (leaving the share only waits for the last window)
        assert rank["final"] == rank["counts"][-1] == {"layer": WARMUP * layers, "window": len(starts)}
    print(f"strides {strides}: {fast['slots']} layers, {fast['window_bytes']} B per window and rank")


@pytest.mark.timeout(300)
def test_exact_mode_runs_only_per_layer_collectives(counted: Any) -> None:
    for rank in counted.result("exact")["ranks"]:
        assert [launched for _, launched in _per_step(rank)] == [{"layer": rank["slots"]}] * 8


# What the other band's value (10 * step + its rank) reads as, per base step of the strides (1, 2) schedule of
# exchange_runs: fresh in synchronous steps (0, 1); at a window start, the last exchange (the previous window
# start, or the last synchronous step); in rank 0's local steps, the line through the last two exchanges at the
# window start (the values are linear in the step, so exactly the window start's), except in the first window,
# where only one exchange exists.
READS = {0: {0: 1, 1: 11, 2: 11, 3: 11, 4: 21, 5: 41, 6: 41, 7: 61}, 1: {0: 0, 1: 10, 2: 10, 4: 20, 6: 40}}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["eager", "compiled"])
def test_each_step_reads_the_context_of_its_schedule(counted: Any, how: str) -> None:
    for rank, res in enumerate(counted.result("schedule")["ranks"]):
        got = res[how]
        assert {index: values for index, values in got["seen"]} == {
            index: [float(v), float(v)] for index, v in READS[rank].items()}  # the fp32 and the fp16 layer
        assert got["collectives"] == {"layer": 4, "window": 3}  # 2 synchronous steps x 2 layers; 3 windows
