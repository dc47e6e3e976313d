"""``stadi run``: a DiffusionJob on this machine. It plans the job for the local devices (each GPU a rank, or N
Gloo ranks on the CPU), checks the output before any rank starts, writes the plan and the job to a run
directory, starts one ``stadi worker`` process per rank (``ranks.Gang``), draws a progress bar from rank 0's
events, and stops every rank as soon as one fails, naming the rank that failed first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from stadi.api import DiffusionJob
from stadi.planner import LINKS, Device, plan_job
from stadi_worker.cli.emulate import parse_slowdown
from stadi_worker.cli.inputs import WorkerError, apply_output_overrides, one_line, read_job
from stadi_worker.cli.progress import ProgressBar
from stadi_worker.cli.ranks import Gang, SignalException, python_module
from stadi_worker.cli.worker import default_device
from stadi_worker.job.storage import StorageError, open_store

log = logging.getLogger(__name__)

STRAGGLER_GRACE_S = 120.0  # after rank 0 finished, how long the others may take to exit


def local_pool(device: str, ranks: int | None) -> tuple[list[Device], float | None]:
    """The planner's pool for this machine, and the link bandwidth to assume (None: the planner decides).

    Each visible CUDA GPU is a device; on CPU, ``ranks`` Gloo ranks of equal speed (the catalogue knows no
    CPU; any equal speed gives the same split).
    """
    host = socket.gethostname()
    if device == "cpu":
        n = ranks if ranks is not None else 2
        return [Device("CPU", node=host, index=i, speed=1.0) for i in range(n)], LINKS["pcie"]
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise WorkerError("--device cuda: no CUDA GPU is visible; use --device cpu")
    n = min(ranks, count) if ranks is not None else count
    if ranks is not None and ranks > count:
        raise WorkerError(f"--ranks {ranks}: only {count} CUDA GPU(s) visible")
    return [Device(torch.cuda.get_device_name(i), node=host, index=i) for i in range(n)], None


def run_local(
    job: DiffusionJob,
    *,
    device: str,
    ranks: int | None = None,
    strategy: str | None = None,
    exact: bool = False,
    credentials_dir: Path | None = None,
    progress_bar: bool | None = None,
    verbose: bool = False,
    log_level: str = "WARNING",
    timeout_s: float | None = None,
    out: IO[str] | None = None,
    slowdown: Sequence[str] = (),
) -> int:
    """Plan ``job`` for this machine, run its ranks as local processes, report where the images are.

    ``slowdown`` (``RANK=FACTOR`` items; tests and benchmarks only) emulates slower devices: it becomes
    every rank's STADI_SLOWDOWN."""
    out = out or sys.stdout
    spec = job.spec
    if strategy:
        spec = spec.model_copy(update={"parallelism": spec.parallelism.model_copy(update={"strategy": strategy})})
        try:
            spec = type(spec).model_validate(spec.model_dump())
        except ValueError as error:
            raise WorkerError(f"--strategy {strategy}: {error}") from None
        job = job.model_copy(update={"spec": spec})
    slow_text = ",".join(slowdown)
    try:
        parse_slowdown(slow_text)
    except ValueError as error:
        raise WorkerError(f"--slowdown: {error}") from None
    pool, link = local_pool(device, ranks)
    try:
        plan = plan_job(spec, pool, link)
    except ValueError as error:
        raise WorkerError(f"cannot plan the job on {len(pool)} {device} rank(s): {error}") from None
    world = plan.world_size
    log.info("planned", extra={"strategy": plan.strategy, "ranks": world, "pool": len(pool)})
    # Fail on a bad output before any rank starts (and before any model is loaded).
    store = open_store(spec.output.uri, spec.output.endpoint, credentials_dir)

    run_dir = Path(tempfile.mkdtemp(prefix="stadi-run-"))
    (run_dir / "plan.json").write_text(plan.model_dump_json(indent=2))
    (run_dir / "job.json").write_text(json.dumps(job.model_dump(by_alias=True, mode="json", exclude_none=True)))
    progress = run_dir / "progress.jsonl"
    # the job file already says where the output goes; these would override it
    inherited = {k: v for k, v in os.environ.items() if k not in ("STADI_OUTPUT", "STADI_ENDPOINT", "STADI_PROGRESS")}
    env = dict(inherited, STADI_PLAN=str(run_dir / "plan.json"), STADI_JOB=str(run_dir / "job.json"),
               STADI_DEVICE=device, STADI_EXACT="1" if exact else "0", STADI_LOG_LEVEL=log_level,
               STADI_SLOWDOWN=slow_text)
    if credentials_dir is not None:
        env["STADI_CREDENTIALS_DIR"] = str(credentials_dir)
    if device == "cpu":
        # Ranks share the cores: without a cap every rank starts one thread per core and they thrash.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ordinals = visible.split(",") if visible else [str(i) for i in range(len(pool))]
        # Rank r drives cuda:r = the GPU the plan gave it (the planner may have left some out).
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ordinals[r.gpu_index or 0] for r in plan.ranks)

    bar = ProgressBar(progress, progress_bar)
    ok = False
    try:
        with Gang(python_module("stadi_worker.cli.worker"), world, run_dir, env=env,
                  rank_env={0: {"STADI_PROGRESS": str(progress)}}, redirect=not verbose) as gang:
            outcome = gang.wait(timeout_s, until=_straggling(bar))
        bar.close()
        if not outcome.ok:
            if outcome.timed_out:
                rank, message = -1, f"job exceeded activeDeadlineSeconds ({timeout_s:g} s)"
            elif outcome.failure is not None:
                rank, message = outcome.failure.rank, outcome.failure.message
            else:
                rank, message = -1, f"still running {STRAGGLER_GRACE_S:g} s after rank 0 finished"
            where = f"rank {rank}" if rank >= 0 else "the ranks"
            print(f"stadi run: {where} failed: {message}", file=sys.stderr)
            print(f"stadi run: rank logs kept in {run_dir}", file=sys.stderr)
            return 1
        ok = True
    except (KeyboardInterrupt, SignalException):
        print("stadi run: interrupted; stopping the ranks", file=sys.stderr)
        return 130
    finally:
        bar.close(1.0)
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)

    print(f"{plan.strategy} plan on {world} {device} rank(s); "
          f"images and manifest.json in {store.base_uri}", file=out)
    for name in bar.images:
        print(f"  {name}", file=out)
    print(f"  {store.uri('manifest.json')}", file=out)
    return 0


def _straggling(bar: ProgressBar) -> Any:
    """``until`` of a gang whose rank 0 said it is done: the others get ``STRAGGLER_GRACE_S`` to exit."""
    import time

    since: list[float] = []

    def late() -> bool:
        if bar.finished.is_set() and not since:
            since.append(time.monotonic())
        return bool(since) and time.monotonic() - since[0] > STRAGGLER_GRACE_S

    return late


def run_command(args: argparse.Namespace) -> int:
    """``stadi run``."""
    try:
        job = read_job(args.job)
        if job.metadata.name is None:
            job.metadata.name = _name_from(Path(args.job))
        job = apply_output_overrides(job, args.output, args.endpoint)
        device = args.device or default_device()
        return run_local(
            job, device=device, ranks=args.ranks, strategy=args.strategy, exact=args.exact,
            credentials_dir=Path(args.credentials_dir) if args.credentials_dir else None,
            progress_bar=False if args.no_progress else None, verbose=args.verbose,
            log_level=getattr(args, "log_level", "WARNING") or "WARNING",
            timeout_s=job.spec.active_deadline_seconds, slowdown=getattr(args, "slowdown", None) or (),
        )
    except (WorkerError, StorageError) as error:
        print(f"stadi run: {one_line(error)}", file=sys.stderr)
        return 1


def _name_from(path: Path) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-")[:63].strip("-")
    return name or "job"
