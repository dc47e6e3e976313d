"""Fixtures of the distributed CPU tests: tiny random pipelines on disk, plans, and a rank launcher."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

STEPS = 8
HEIGHT = WIDTH = 128  # 16x16 latent rows/columns: bands of 4 (SDXL) or 2 (SD3) rows
RANK_TIMEOUT_S = 100  # a launch that takes longer is killed: a stuck rank never hangs the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache dir where ``random://tiny`` pipelines get saved once per session (built on first use)."""
    return tmp_path_factory.mktemp("stadi-models")


@pytest.fixture(scope="session")
def tiny_dir(model_cache: Path):
    """``tiny_dir(family)`` -> the saved tiny pipeline of ``family`` (built in this process, once)."""
    from stadi_worker.pipelines import resolve_source

    from stadi.api import ModelSource

    def get(family: str) -> Path:
        return resolve_source(ModelSource(family=family, source="random://tiny", dtype="float32"), model_cache)

    return get


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


def _rank_main(env: dict[str, str], config: dict[str, Any], err_path: str, module: str) -> None:
    """Child body: torchrun's env, stderr to a file, then the module's ``run(config)``."""
    import importlib
    import traceback

    os.environ.update(env)
    with open(err_path, "w") as err:
        os.dup2(err.fileno(), 2)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - lives as long as the process
    try:
        importlib.import_module(module).run(config)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)


def launch_ranks(world: int, config: dict[str, Any], workdir: Path, timeout: float = RANK_TIMEOUT_S,
                 module: str = "stadi_worker.parity") -> Launch:
    """Start ``world`` ranks running ``module.run(config)`` with torchrun's env on a free loopback port and
    kill them all when the timeout passes.

    Ranks are forked from this process after it imported torch and diffusers: re-importing them costs
    ~20 s of CPU per rank on a 2-core machine, more than the whole tiny generation.
    """
    import multiprocessing as mp

    import diffusers  # noqa: F401 - imported before the fork on purpose
    import torch  # noqa: F401

    workdir.mkdir(parents=True, exist_ok=True)
    config = {"out": str(workdir / "out"), "threads": 1, "device": "cpu", **config}
    (workdir / "config.json").write_text(json.dumps(config))
    port = free_port()
    ctx = mp.get_context("fork")
    procs = []
    start = time.monotonic()
    for rank in range(world):
        env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "STADI_DIST_TIMEOUT_S": "60",
               "STADI_TRACEBACK_AFTER_S": str(max(5, timeout - 5))}
        p = ctx.Process(target=_rank_main, args=(env, config, str(workdir / f"rank{rank}.err"), module))
        p.start()
        procs.append(p)
    deadline = start + timeout
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
    codes: list[int | None] = []
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    stderr = [(workdir / f"rank{r}.err").read_text() if (workdir / f"rank{r}.err").exists() else ""
              for r in range(world)]
    return Launch(codes, stderr, Path(config["out"]), time.monotonic() - start)


@pytest.fixture
def launch():
    return launch_ranks
