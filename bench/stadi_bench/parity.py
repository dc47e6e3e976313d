"""Fidelity runner: one job spec under several plans on the ranks of this process group.

``python -m stadi_bench.parity CONFIG.json`` on every rank (torchrun env). The config holds ``spec`` (a
DiffusionJobSpec document), ``prompt`` and ``seed`` (or ``cases``: a list of ``{"prompt", "seed"}``), ``device``,
``cache_dir``, ``out`` and ``runs``: a list of ``{"name", "plan" (a Plan document, or null for the serial
reference on rank 0), "exact", "replan", "slowdown" ({rank: factor})}``. Rank 0 writes ``out/NAME.pt`` (with
``cases``: ``out/NAME@I.pt`` for case I) with the final latent, the decoded image in [0, 1], every rank's step
times, model evaluations and exchange points (and under the branch strides, per step the base index of the
latent each guiding unconditional prediction came from, and the evaluations of uncond bands), the final plan
and the measured speeds. The CPU tests and ``stadi bench fidelity`` both use it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from stadi_worker.cli.emulate import pacer
from stadi_worker.engine.bands import Workspace
from stadi_worker.engine.generate import generate
from stadi_worker.engine.runtime import init_from_env, shutdown
from stadi_worker.engine.serial import generate_serial
from stadi_worker.job.loading import load_pipeline
from stadi_worker.models import ops_for
from stadi_worker.settings import WorkerSettings

from stadi.api import DiffusionJobSpec, Plan


def run(config: dict[str, Any]) -> None:
    """Run every entry of ``config["runs"]`` and save rank 0's results."""
    settings = WorkerSettings()
    threads = config.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    ctx = init_from_env(config.get("device", "cpu"), settings.dist_timeout_s)
    try:
        spec = DiffusionJobSpec.model_validate(config["spec"])
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        pipe = load_pipeline(spec.model, ctx.device, Path(config["cache_dir"]))
        cases = config.get("cases")
        named = [(c["prompt"], int(c["seed"]), f"@{i}") for i, c in enumerate(cases)] if cases is not None else [
            (config["prompt"], config["seed"], "")]
        for entry in config["runs"]:
            for prompt, seed, suffix in named:
                _run_entry(entry, pipe, spec, ctx, settings, prompt, seed, out / f"{entry['name']}{suffix}.pt")
    finally:
        shutdown(ctx, settings.teardown_s)


def _run_entry(entry: dict[str, Any], pipe: Any, spec: DiffusionJobSpec, ctx: Any, settings: WorkerSettings,
               prompt: str, seed: int, path: Path) -> None:
    """One run of ``entry`` for one prompt and seed; rank 0 saves it at ``path``."""
    if entry.get("plan") is None:
        if ctx.rank == 0:
            res = generate_serial(pipe, spec, prompt, seed)
            torch.save({"latents": res.latents, "step_ms": [res.step_ms], "evals": [res.evals],
                        "image": ops_for(pipe, spec.model.family).decode_tensor(res.latents)}, path)
        if ctx.world_size > 1:
            dist.barrier()
        return
    plan = Plan.model_validate(entry["plan"])
    slow = {int(k): float(v) for k, v in (entry.get("slowdown") or {}).items()}
    res = generate(pipe, spec, plan, ctx, prompt, seed, exact=entry.get("exact", False),
                   replan_after_warmup=entry.get("replan", False),
                   pace=pacer(slow.get(ctx.rank, 1.0), ctx.device), workspace=Workspace(settings.engine))
    mine = (res.step_ms, res.evals, res.exchanges, getattr(res, "uncond_from", None),
            getattr(res, "band_evals", None), getattr(res, "band_collectives", None))
    every: list[Any] = [mine]
    if ctx.world_size > 1:
        every = [None] * ctx.world_size
        dist.all_gather_object(every, mine)
    if ctx.rank == 0:
        torch.save({"latents": res.latents, "step_ms": [e[0] for e in every],
                    "evals": [e[1] for e in every], "exchanges": [e[2] for e in every],
                    "uncond_from": [e[3] for e in every], "band_evals": [e[4] for e in every],
                    "band_collectives": [e[5] for e in every],
                    "image": ops_for(pipe, spec.model.family).decode_tensor(res.latents),
                    "plan": (res.plan or plan).model_dump(mode="json"),
                    "measured_speeds": res.measured_speeds, "replanned": res.replanned}, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stadi_bench.parity CONFIG.json", file=sys.stderr)
        return 2
    run(json.loads(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
