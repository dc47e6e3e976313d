"""Rank body of the idle-rank job test: ``run(config)`` on every rank (see conftest.launch_ranks).

Runs ``run_job`` with the real core on ``config["spec"]`` and ``config["plan"]``, this rank paced by
``config["slowdown"]`` ({rank: factor}); rank 0 writes the images and the manifest under ``config["out"]`` and
saves its progress events to ``out/events.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from stadi_worker.job_runner import ProgressEvent, run_job
from stadi_worker.runtime import init_from_env, shutdown
from stadi_worker.storage import LocalStore

from stadi.api import DiffusionJobSpec, Plan


def run(config: dict[str, Any]) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("STADI_TRACEBACK_AFTER_S", "90")), exit=True)
    torch.set_num_threads(int(config.get("threads", 1)))
    os.environ["STADI_SLOWDOWN"] = ",".join(f"{r}={f}" for r, f in config.get("slowdown", {}).items())
    ctx = init_from_env("cpu")
    try:
        out = Path(config["out"])
        events: list[ProgressEvent] = []
        store = LocalStore(out) if ctx.rank == 0 else None
        run_job(DiffusionJobSpec.model_validate(config["spec"]), Plan.model_validate(config["plan"]), ctx, store,
                events.append, job_name="idle", cache_dir=Path(config["cache_dir"]))
        if ctx.rank == 0:
            (out / "events.json").write_text(json.dumps([asdict(e) for e in events]))
    finally:
        shutdown(ctx)
