"""Banded steps under the CUDA-graph contract, on the CPU: two images through one workspace whose graphs
replay each key's kept step function on copies of its inputs (``hybrid_runs.ReplayGraphs``) give the eager
runs' latents bit for bit, with one key per band share and phase (sync, exchange, local) and the second
image replaying every key (no band wrapper, buffer or graph is rebuilt per image)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import job_spec, launch_ranks, make_plan

PROMPTS = ("a red bicycle in the snow", "a lighthouse at dusk")


def _stadi_plan() -> dict[str, Any]:
    doc = make_plan("sdxl", [(0, 4), (4, 16)], warmup=2, strategy="stadi")  # unequal bands, fast rank first
    for r, k in zip(doc["ranks"], (1, 2), strict=True):
        r["stride"] = k
    doc["sync_period"] = math.lcm(1, 2)
    return doc


@pytest.fixture(scope="module")
def runs(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tiny_dir("sdxl")
    plan = _stadi_plan()
    entries = [{"name": f"{how}_{i}", "plan": plan, "prompt": p, **({"workspace": "w"} if how == "graphs" else {})}
               for how in ("eager", "graphs") for i, p in enumerate(PROMPTS)]
    cfg = {"spec": job_spec("sdxl"), "prompt": PROMPTS[0], "seed": 3, "cache_dir": str(model_cache),
           "runs": entries}
    return launch_ranks(2, cfg, tmp_path_factory.mktemp("step-graphs"), module="hybrid_runs").check()


def test_replayed_banded_steps_equal_the_eager_ones(runs: Any) -> None:
    for i in range(len(PROMPTS)):
        assert torch.equal(runs.result(f"graphs_{i}")["latents"], runs.result(f"eager_{i}")["latents"])
    assert not torch.equal(runs.result("graphs_0")["latents"], runs.result("graphs_1")["latents"])


def test_one_key_per_phase_and_the_second_image_replays_them_all(runs: Any) -> None:
    first = {k[-1]: (calls, replays) for k, calls, replays in runs.result("graphs_0")["ranks"][0][6]}
    second = {k[-1]: (calls, replays) for k, calls, replays in runs.result("graphs_1")["ranks"][0][6]}
    slow = {k[-1] for k, _, _ in runs.result("graphs_1")["ranks"][1][6]}
    # rank 0 (stride 1) steps inside windows alone: local steps; rank 1 (stride 2) only at window starts
    assert set(first) == set(second) == {"sync", "exchange", "local"} and slow == {"sync", "exchange"}
    for phase, (calls, replays) in second.items():
        before_calls, before_replays = first[phase]
        assert calls > before_calls and replays - before_replays == calls - before_calls  # all replayed
