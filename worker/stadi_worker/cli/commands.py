"""The worker's subcommands of ``stadi``: ``run`` (a job on this machine) and ``worker`` (one rank).

Loaded by ``stadi.cli`` through the ``stadi.commands`` entry-point group; heavy imports (torch, boto3)
happen only when a command runs, so ``stadi --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from stadi_worker.cli.flags import add_run_arguments, add_worker_arguments


def _run(args: argparse.Namespace) -> int:
    from stadi_worker.cli.run import run_command

    return run_command(args)


def _worker(args: argparse.Namespace) -> int:
    from stadi_worker.cli.worker import worker_command

    return worker_command(args)


def register(subparsers: Any) -> None:
    """Add ``run`` and ``worker`` to the ``stadi`` command."""
    run = subparsers.add_parser(
        "run", help="run a DiffusionJob on this machine (each GPU a rank, or N CPU ranks)",
        description="Plan a DiffusionJob for the local devices, run its ranks, write the images and "
        "manifest.json, and print where they are.",
    )
    add_run_arguments(run)
    run.set_defaults(func=_run)

    worker = subparsers.add_parser(
        "worker", help="run one rank of a DiffusionJob (used by Kubernetes pods and by stadi run)",
        description="One rank: rendezvous from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; every "
        "STADI_* setting from the environment, overridden by these flags; plan and job from flags, env or the "
        "mounted ConfigMap.",
    )
    add_worker_arguments(worker)
    worker.set_defaults(func=_worker)
