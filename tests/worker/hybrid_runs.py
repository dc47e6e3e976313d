"""Rank body of the hybrid tests: ``run(config)`` on every rank (see conftest.launch_ranks).

``config["runs"]``: ``{"name", "plan" (a Plan document, null: the serial reference on rank 0), "exact",
"replan", "slowdown" ({rank: factor})}``. Rank 0 saves ``out/NAME.pt`` with the final latent and what the
hybrid loop recorded (modes, discrepancy, window, cut, final plan).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from stadi_worker.generate import generate, generate_serial
from stadi_worker.pipelines import load_pipeline
from stadi_worker.runtime import init_from_env, shutdown

from stadi.api import DiffusionJobSpec, Plan


def run(config: dict[str, Any]) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("STADI_TRACEBACK_AFTER_S", "90")), exit=True)
    torch.set_num_threads(int(config.get("threads", 1)))
    ctx = init_from_env("cpu")
    try:
        spec = DiffusionJobSpec.model_validate(config["spec"])
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        pipe = load_pipeline(spec.model, ctx.device, Path(config["cache_dir"]))
        for entry in config["runs"]:
            if entry["plan"] is None:
                if ctx.rank == 0:
                    res = generate_serial(pipe, spec, config["prompt"], config["seed"], decode=False)
                    torch.save({"latents": res.latents}, out / f"{entry['name']}.pt")
                dist.barrier()
                continue
            slow = {int(k): float(v) for k, v in (entry.get("slowdown") or {}).items()}
            res: Any = generate(pipe, spec, Plan.model_validate(entry["plan"]), ctx, config["prompt"],
                                config["seed"], exact=entry.get("exact", False),
                                replan_after_warmup=entry.get("replan", False), slowdown=slow.get(ctx.rank, 1.0),
                                decode=False)
            mine = (res.modes, res.discrepancy, res.window, res.boundary_layer, len(res.step_ms), res.wait_ms)
            every: list[Any] = [None, None]
            dist.all_gather_object(every, mine)
            if ctx.rank == 0:
                torch.save({"latents": res.latents, "ranks": every, "plan": res.plan.model_dump(mode="json"),
                            "replanned": res.replanned, "measured_speeds": res.measured_speeds},
                           out / f"{entry['name']}.pt")
    finally:
        shutdown(ctx)
