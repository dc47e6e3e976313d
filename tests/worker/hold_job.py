"""Rank body of the idle-hold test: ``run(config)`` on 2 ranks (see conftest.launch_ranks).

Rank 0 is busy for ``busy_s`` (an active rank finishing a long image), rank 1 is idle; then both join an
all_gather under a process-group timeout of ``timeout_s``. With ``hold`` the idle rank first waits in the
rendezvous store (``runtime.hold_idle``); each rank writes what it gathered to ``out/rank{r}.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from stadi_worker.engine.runtime import hold_idle, init_from_env, shutdown


def run(config: dict[str, Any]) -> None:
    ctx = init_from_env("cpu", timeout_s=config["timeout_s"])
    try:
        idle = ctx.rank == 1
        if not idle:
            time.sleep(config["busy_s"])
        if config["hold"]:
            hold_idle(ctx, "stadi/test/image-end", idle=idle, announce=not idle)
        parts = [torch.zeros(1) for _ in range(ctx.world_size)]
        dist.all_gather(parts, torch.full((1,), float(ctx.rank)))
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{ctx.rank}.json").write_text(json.dumps([float(p) for p in parts]))
    finally:
        shutdown(ctx)
