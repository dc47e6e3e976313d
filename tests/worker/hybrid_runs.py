"""Rank body of the hybrid and step-graph tests: ``run(config)`` on every rank (see conftest.launch_ranks).

``config["runs"]``: ``{"name", "plan" (a Plan document, null: the serial reference on rank 0), "exact",
"replan", "slowdown" ({rank: factor}), "prompt" (else the config's), "workspace" (a name: runs naming the
same one share a Workspace whose graphs are ``ReplayGraphs``)}``. Rank 0 saves ``out/NAME.pt`` with the
final latent and what the hybrid loop recorded (modes, discrepancy, window, cut, final plan, and per rank
the graph keys with their calls and replays so far).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from stadi_worker.cli.emulate import pacer
from stadi_worker.engine.bands import Workspace
from stadi_worker.engine.generate import generate
from stadi_worker.engine.graphs import StepGraphs
from stadi_worker.engine.runtime import init_from_env, shutdown
from stadi_worker.engine.serial import generate_serial
from stadi_worker.job.loading import load_pipeline
from stadi_worker.settings import WorkerSettings

from stadi.api import DiffusionJobSpec, Plan


@dataclass
class ReplayGraphs(StepGraphs):
    """CUDA graphs' contract on the CPU: a key's first call runs eagerly; the second keeps ``fn`` and copies
    of the inputs; later calls copy their inputs into those and run the kept ``fn`` on them, as a replay
    would. A step function that reads anything but its inputs computes with the keeping call's state."""

    enabled: bool = False
    calls: Counter[Hashable] = field(default_factory=Counter)
    replays: Counter[Hashable] = field(default_factory=Counter)
    _kept: dict[Hashable, tuple[Callable[..., torch.Tensor], list[torch.Tensor]]] = field(default_factory=dict)

    def run(self, key: Hashable, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        self.calls[key] += 1
        full = self._full_key(key, inputs)
        if full not in self._seen:
            self._seen.add(full)
            return fn(*inputs)
        if full not in self._kept:
            self._kept[full] = fn, [x.clone() for x in inputs]
        else:
            self.replays[key] += 1
        kept, static = self._kept[full]
        for s, x in zip(static, inputs, strict=True):
            s.copy_(x)
        return kept(*static).clone()


def run(config: dict[str, Any]) -> None:
    torch.set_num_threads(int(config.get("threads", 1)))
    ctx = init_from_env("cpu", WorkerSettings().dist_timeout_s)
    try:
        spec = DiffusionJobSpec.model_validate(config["spec"])
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        pipe = load_pipeline(spec.model, ctx.device, Path(config["cache_dir"]))
        workspaces: dict[str, Workspace] = {}
        for entry in config["runs"]:
            if entry["plan"] is None:
                if ctx.rank == 0:
                    res = generate_serial(pipe, spec, config["prompt"], config["seed"], decode=False)
                    torch.save({"latents": res.latents}, out / f"{entry['name']}.pt")
                dist.barrier()
                continue
            slow = {int(k): float(v) for k, v in (entry.get("slowdown") or {}).items()}
            ws = None
            if entry.get("workspace"):
                ws = workspaces.setdefault(entry["workspace"], Workspace(graphs=ReplayGraphs()))
            res: Any = generate(pipe, spec, Plan.model_validate(entry["plan"]), ctx,
                                entry.get("prompt", config["prompt"]), config["seed"], exact=entry.get("exact", False),
                                replan_after_warmup=entry.get("replan", False),
                                pace=pacer(slow.get(ctx.rank, 1.0), ctx.device),
                                decode=False, workspace=ws)
            graphs = ws.graphs if ws is not None else None
            keys = []
            if isinstance(graphs, ReplayGraphs):
                keys = [(k, n, graphs.replays[k]) for k, n in graphs.calls.items()]
            # hybrid results carry the mode record; other strategies' plain results leave it empty
            mine = (getattr(res, "modes", None), getattr(res, "discrepancy", None), getattr(res, "window", None),
                    getattr(res, "boundary_layer", None), len(res.step_ms), res.wait_ms, keys)
            every: list[Any] = [None, None]
            dist.all_gather_object(every, mine)
            if ctx.rank == 0:
                torch.save({"latents": res.latents, "ranks": every, "plan": res.plan.model_dump(mode="json"),
                            "replanned": res.replanned, "measured_speeds": res.measured_speeds},
                           out / f"{entry['name']}.pt")
    finally:
        shutdown(ctx)
