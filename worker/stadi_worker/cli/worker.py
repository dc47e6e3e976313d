"""``stadi worker``: one rank of a DiffusionJob, the per-rank entry of Kubernetes pods (under torchrun) and of
``stadi run``.

Its inputs are the ``WorkerSettings`` (``STADI_*`` environment variables, overridden by flags): the plan and the
job (a file, inline JSON, or the mounted ConfigMap in ``/etc/stadi``), output overrides, the device; the
rendezvous comes from torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Rank 0 reports
progress as JSON lines (``--progress``) and into the job's status when the operator launched it. A failing
rank prints one line and records it where its launcher looks (``ranks.record_failure``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

from pydantic import ValidationError

from stadi_worker.cli.flags import add_worker_arguments
from stadi_worker.cli.inputs import WorkerError, apply_output_overrides, one_line, resolve_inputs
from stadi_worker.cli.progress import progress_sink
from stadi_worker.cli.ranks import record_failure
from stadi_worker.job.status import StatusReporter, compose, for_job, reporting
from stadi_worker.job.storage import open_store
from stadi_worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def settings_from(args: argparse.Namespace) -> WorkerSettings:
    """The environment's settings with the flags that were given on top; WorkerError names a bad variable."""
    flags = {k: v for k, v in vars(args).items()
             if k in WorkerSettings.model_fields and v is not None}
    try:
        return WorkerSettings(**flags)
    except ValidationError as error:
        problems = [f"STADI_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors()]
        raise WorkerError("; ".join(problems)) from None


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def status_reporter(settings: WorkerSettings) -> StatusReporter | None:
    """Rank 0's reporter into the job's status, as the settings configure it (None: nothing to report to)."""
    return for_job(settings.job_name, settings.job_namespace, interval=settings.progress_interval,
                   kubeconfig=settings.kubeconfig, token_file=settings.kube_token_file, ca_file=settings.kube_ca_file)


def _rank() -> int:
    """This process's rank as torchrun says (0 before it says anything readable)."""
    text = os.environ.get("RANK", "0")
    return int(text) if text.isdigit() else 0


def run_worker(settings: WorkerSettings) -> int:
    """One rank: set up the process group, check the plan, run the job. Returns the exit code."""
    rank = _rank()
    for name, value in settings.compile_env.items():
        os.environ.setdefault(name, value)  # read by torch when it first compiles; an explicit setting wins
    try:
        dj, the_plan = resolve_inputs(settings.plan, settings.job, settings.config_dir)
        dj = apply_output_overrides(dj, settings.output, settings.endpoint)
        spec = dj.spec
        device = settings.device or default_device()

        from stadi_worker.cli.emulate import green_context, pacer, slowdown_factor
        from stadi_worker.engine import runtime
        from stadi_worker.engine.plan_check import check_plan
        from stadi_worker.job.runner import run_job

        ctx = runtime.init_from_env(device, settings.dist_timeout_s)
        rank = ctx.rank
        check_plan(the_plan, spec, ctx)
        credentials = settings.output_credentials()
        store = None
        if rank == 0:
            # Only rank 0 writes; the other ranks need no credentials.
            store = open_store(spec.output.uri, spec.output.endpoint, credentials)
        log.info("rank started", extra={"rank": rank, "world_size": ctx.world_size, "device": str(ctx.device)})
        name = dj.metadata.name or settings.job_name or "job"
        factor = slowdown_factor(rank, settings.slowdown)

        with (progress_sink(settings.progress if rank == 0 else None) as emit,
              reporting(partial(status_reporter, settings) if rank == 0 else None) as to_status,
              green_context(factor, ctx.device)):
            # Rank 0's events also go to the job's status (best-effort, throttled, never raises).
            manifest = run_job(spec, the_plan, ctx, store, compose(emit, to_status), job_name=name,
                               exact=settings.exact, cache_dir=settings.models_dir, credentials_dir=credentials,
                               limits=settings.limits, options=settings.engine, pace=pacer(factor, ctx.device))
            if manifest is not None and to_status is not None:
                to_status.finish(manifest)  # every rank's step times into status.measured
        if manifest is not None:
            log.info("job done", extra={"output": manifest.output, "images": len(manifest.images)})
        with contextlib.suppress(Exception):  # the job is done and written: a failed goodbye changes nothing
            runtime.shutdown(ctx, settings.teardown_s)
        return 0
    except Exception as error:  # the rank's last word: one line on stderr, the details in the error record
        record_failure(rank, one_line(error), error)
        log.debug("rank failed", exc_info=True)
        print(f"stadi worker rank {rank}: {one_line(error)}", file=sys.stderr, flush=True)
        return 1


def worker_command(args: argparse.Namespace, *, configure_logs: bool = False) -> int:
    """``stadi worker`` (``configure_logs``: log at the settings' ``log_level``; ``stadi`` configures its own)."""
    _die_with_parent()
    try:
        settings = settings_from(args)
    except WorkerError as error:
        record_failure(_rank(), str(error), error)
        print(f"stadi worker rank {_rank()}: {error}", file=sys.stderr, flush=True)
        return 1
    if configure_logs:
        from stadi import logs

        logs.configure(settings.log_level)
    return run_worker(settings)


def _die_with_parent() -> None:
    """Linux: this rank gets SIGTERM when the process that started it (stadi run, torchrun) dies, even by
    SIGKILL, so no rank outlives its launcher."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stadi_worker.cli.worker``: one rank, configured from the environment (as ``stadi worker``),
    logging at ``STADI_LOG_LEVEL``."""
    parser = argparse.ArgumentParser(prog="stadi-worker", description="Run one rank of a DiffusionJob.")
    add_worker_arguments(parser)
    args: Any = parser.parse_args(argv)
    return worker_command(args, configure_logs=True)


if __name__ == "__main__":
    sys.exit(main())
