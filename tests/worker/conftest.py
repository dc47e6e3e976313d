"""Fixtures of the distributed CPU tests: tiny random pipelines on disk, plans, and a rank launcher."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

STEPS = 8
HEIGHT = WIDTH = 128  # 16x16 latent rows/columns: bands of 4 (SDXL) or 2 (SD3) rows
RANK_TIMEOUT_S = 100  # a launch that takes longer is killed: a stuck rank never hangs the suite


def job_spec(family: str, guidance: float = 5.0, steps: int = STEPS, **extra: Any) -> dict[str, Any]:
    """A DiffusionJob spec document for a tiny model."""
    return {
        "model": {"family": family, "source": "random://tiny", "dtype": "float32"},
        "prompts": ["a red bicycle in the snow"],
        "height": HEIGHT, "width": WIDTH, "steps": steps, "guidanceScale": guidance, "seed": 7,
        "parallelism": {"warmupSteps": 0, "minEffectiveSteps": 1},
        "output": {"uri": "file:///tmp/stadi-test-out"},
        **extra,
    }


def make_plan(family: str, bands: list[tuple[int, int]], branches: list[str] | None = None,
              warmup: int = 0, steps: int = STEPS, strategy: str = "patch", guidance: bool = True,
              latent: int = HEIGHT // 8, granularity: int | None = None) -> dict[str, Any]:
    """A Plan document with one rank per band."""
    from stadi.families import profile

    branches = branches or ["both"] * len(bands)
    return {
        "strategy": strategy, "family": family, "latent_height": latent, "latent_width": latent,
        "granularity": granularity or profile(family).granularity, "steps": steps, "guidance": guidance,
        "warmup_steps": warmup, "predicted_seconds": 1.0,
        "ranks": [{"rank": i, "gpu": "cpu", "speed": 1.0, "rows": list(b), "branch": br}
                  for i, (b, br) in enumerate(zip(bands, branches, strict=True))],
    }


@dataclass
class Launch:
    returncodes: list[int | None]
    stderr: list[str]
    out: Path
    seconds: float

    def result(self, name: str) -> dict[str, Any]:
        import torch

        return torch.load(self.out / f"{name}.pt")

    def check(self) -> Launch:
        if any(rc != 0 for rc in self.returncodes):
            tails = "\n".join(f"--- rank {i} rc={rc}\n{err[-3000:]}"
                              for i, (rc, err) in enumerate(zip(self.returncodes, self.stderr, strict=True)))
            raise AssertionError(f"ranks failed:\n{tails}")
        return self


def _rank_main(module: str, config: dict[str, Any], traceback_after_s: float) -> int:
    """A rank's body: ``module.run(config)``. A failure is printed and returned as exit code 1 rather than
    raised, so that the launcher does not stop the other ranks: each one runs to its own end (a test may check
    that every rank fails by itself); one stuck past ``traceback_after_s`` prints where, and exits."""
    import faulthandler
    import importlib
    import traceback

    faulthandler.dump_traceback_later(traceback_after_s, exit=True)
    try:
        importlib.import_module(module).run(config)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def launch_ranks(world: int, config: dict[str, Any], workdir: Path, timeout: float = RANK_TIMEOUT_S,
                 module: str = "stadi_bench.parity") -> Launch:
    """Run ``module.run(config)`` on ``world`` ranks through the worker's one launcher of local ranks, killed
    all when the timeout passes (exit codes None then: a hang).

    Ranks are forked from this process after it imported torch and diffusers: re-importing them costs
    ~20 s of CPU per rank on a 2-core machine, more than the whole tiny generation.
    """
    import diffusers  # noqa: F401 - imported before the fork on purpose
    import torch  # noqa: F401
    from stadi_worker.cli.ranks import Gang, rank_log

    workdir.mkdir(parents=True, exist_ok=True)
    config = {"out": str(workdir / "out"), "threads": 1, "device": "cpu", **config}
    (workdir / "config.json").write_text(json.dumps(config))
    start = time.monotonic()
    logs = workdir / "ranks"
    with Gang(_rank_main, world, logs, args=(module, config, max(5, timeout - 5)),
              env={"STADI_DIST_TIMEOUT_S": "60"}, start_method="fork") as gang:
        outcome = gang.wait(timeout)
    codes = [outcome.values.get(r, code) for r, code in enumerate(outcome.codes)]
    stderr = [rank_log(logs, r).read_text() if rank_log(logs, r).exists() else "" for r in range(world)]
    return Launch(codes, stderr, Path(config["out"]), time.monotonic() - start)


@pytest.fixture
def launch():
    return launch_ranks
