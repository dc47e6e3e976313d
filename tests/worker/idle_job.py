"""Rank body of the idle-rank job test: ``run(config)`` on every rank (see conftest.launch_ranks).

Runs ``run_job`` with the real core on ``config["spec"]`` and ``config["plan"]``, this rank paced by
``config["slowdown"]`` ({rank: factor}); rank 0 writes the images and the manifest under ``config["out"]`` and
saves its progress events to ``out/events.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from stadi_worker.cli.emulate import pacer
from stadi_worker.engine.runtime import init_from_env, shutdown
from stadi_worker.job.progress import ProgressEvent
from stadi_worker.job.runner import run_job
from stadi_worker.job.storage import LocalStore
from stadi_worker.settings import WorkerSettings

from stadi.api import DiffusionJobSpec, Plan


def run(config: dict[str, Any]) -> None:
    torch.set_num_threads(int(config.get("threads", 1)))
    settings = WorkerSettings()
    ctx = init_from_env("cpu", settings.dist_timeout_s)
    factor = {int(r): float(f) for r, f in config.get("slowdown", {}).items()}.get(ctx.rank, 1.0)
    try:
        out = Path(config["out"])
        events: list[ProgressEvent] = []
        store = LocalStore(out) if ctx.rank == 0 else None
        run_job(DiffusionJobSpec.model_validate(config["spec"]), Plan.model_validate(config["plan"]), ctx, store,
                events.append, job_name="idle", cache_dir=Path(config["cache_dir"]),
                pace=pacer(factor, ctx.device))
        if ctx.rank == 0:
            (out / "events.json").write_text(json.dumps([asdict(e) for e in events]))
    finally:
        shutdown(ctx)
