"""Rank body of the window-exchange tests: ``run(config)`` on every rank (see conftest.launch_ranks).

``config["runs"]``: ``{"name", "plan" (a Plan document), "exact", "steps"}``. Rank 0 saves ``out/NAME.pt`` with,
per rank, the base indices of its steps (``evals``), those that were window starts or synchronous
(``exchanges``), the counts of collectives its ``CommManager`` had launched after each step (``counts``) and
after the image (``final``), its number of wrapped layers (``slots``) and its bytes per window exchange. With
``config["schedule"]`` it also saves ``out/schedule.pt``: what a ``CommManager`` hands two layers of known values
over a strided schedule, eager and compiled (``schedule``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from stadi_worker.engine.bands import Workspace
from stadi_worker.engine.comm import BandLayout, CommManager
from stadi_worker.engine.generate import generate
from stadi_worker.engine.runtime import init_from_env, shutdown
from stadi_worker.job.loading import load_pipeline
from stadi_worker.models import ops_for
from stadi_worker.settings import WorkerSettings

from stadi.api import DiffusionJobSpec, Plan


def run(config: dict[str, Any]) -> None:
    torch.set_num_threads(int(config.get("threads", 1)))
    ctx = init_from_env("cpu", WorkerSettings().dist_timeout_s)
    try:
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        base = DiffusionJobSpec.model_validate(config["spec"])
        pipe = load_pipeline(base.model, ctx.device, Path(config["cache_dir"]))
        for entry in config["runs"]:
            mine = _counted(pipe, base.model_copy(update={"steps": entry["steps"]}), Plan.model_validate(entry["plan"]),
                            ctx, config, entry.get("exact", False))
            every: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(every, mine)
            if ctx.rank == 0:
                torch.save({"ranks": every}, out / f"{entry['name']}.pt")
        if config.get("schedule"):
            mine = {"eager": schedule(ctx.rank, compiled=False), "compiled": schedule(ctx.rank, compiled=True)}
            every = [None] * ctx.world_size
            dist.all_gather_object(every, mine)
            if ctx.rank == 0:
                torch.save({"ranks": every}, out / "schedule.pt")
    finally:
        shutdown(ctx)


def _counted(pipe: Any, spec: DiffusionJobSpec, plan: Plan, ctx: Any, config: dict[str, Any],
             exact: bool) -> dict[str, Any]:
    """One image under ``plan`` and what this rank's ``CommManager`` launched, step by step."""
    ws = Workspace()
    # the share generate will use (the workspace builds it once per plan), to read its counters
    comm = ws.bands(ops_for(pipe, spec.model.family), spec, plan, ctx).comm
    counts: list[dict[str, int]] = []
    res = generate(pipe, spec, plan, ctx, config["prompt"], config["seed"], exact=exact,
                   on_step=lambda done, total: counts.append(dict(comm.collectives)), decode=False, workspace=ws)
    return {"evals": res.evals, "exchanges": res.exchanges, "counts": counts, "final": dict(comm.collectives),
            "slots": len(comm.slots), "window_bytes": comm.window_bytes}


# strides (1, 2) after 2 synchronous steps: rank 0 takes every base step, rank 1 only the window starts
SCHEDULE = [(0, "sync"), (1, "sync"), (2, "exchange"), (3, "local"), (4, "exchange"), (5, "local"), (6, "exchange"),
            (7, "local")]


def schedule(rank: int, compiled: bool) -> dict[str, Any]:
    """Two layers (fp32 and fp16, bands of 2 and 3 rows) whose band r sends ``10 * step + r`` at every step: per
    step and layer, the value this rank reads from the other band; and the collectives launched."""
    sizes = [2, 3]
    comm = CommManager(layout=BandLayout(bands=((0, 2), (2, 5)), index=rank, height=5), local_steps=rank == 0)
    keys = {dtype: comm.new_key() for dtype in (torch.float32, torch.float16)}

    def layer(x: torch.Tensor, key: int) -> torch.Tensor:
        parts = comm.exchange(key, x, sizes, dim=0)
        return torch.cat([p.float().mean(1) for p in parts])  # traced: what a layer's combining would be

    run = torch.compile(layer, backend="eager") if compiled else layer
    seen: list[tuple[int, list[float]]] = []
    for index, mode in SCHEDULE:
        if mode == "local" and rank != 0:
            continue
        comm.begin_step(sync=mode == "sync", mode="local" if mode == "local" else "exchange", index=index)
        values = []
        for dtype, key in keys.items():
            out = run(torch.full((sizes[rank], 4), 10.0 * index + rank, dtype=dtype), key)
            values.append(float(out[0 if rank == 1 else -1]))  # a row of the other band
        comm.end_step()
        seen.append((index, values))
    comm.settle()
    return {"seen": seen, "collectives": dict(comm.collectives)}
