"""The control plane's subcommands of ``stadi``: ``operator`` (kopf), ``agent`` (the node agent) and
``dev-cluster``.

Loaded by ``stadi.cli`` through the ``stadi.commands`` entry-point group; kopf and the kubernetes client are
imported only when a command runs, so ``stadi --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any


def run_operator(args: argparse.Namespace) -> int:
    """Run the operator until interrupted: one replica, so standalone (no peering objects needed)."""
    import kopf

    from stadi_operator.controller.handlers import register
    from stadi_operator.settings import OperatorSettings

    overrides: dict[str, Any] = {}
    if args.namespace:
        overrides["namespaces"] = args.namespace
    if args.liveness is not None:
        overrides["liveness_port"] = args.liveness
    settings = OperatorSettings(**overrides)
    registry = register(kopf.OperatorRegistry(), settings)
    namespaces = settings.namespaces
    kopf.run(
        registry=registry,
        memo=kopf.Memo(options=settings),
        standalone=args.standalone,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None,
    )
    return 0


def register_dev_cluster(subparsers: Any) -> None:
    """``stadi dev-cluster prepare|up|down|status``: a local control plane with fake GPU nodes (standard library
    only at import, so registering it costs nothing)."""
    from stadi_operator.devcluster.cli import add_parser

    add_parser(subparsers)


def register(subparsers: Any) -> None:
    """Add ``operator``, ``agent`` and ``dev-cluster`` to the ``stadi`` command."""
    from stadi_operator.agent import add_parser as add_agent_parser

    op = subparsers.add_parser(
        "operator", help="run the DiffusionJob operator (kopf)",
        description="Watch DiffusionJobs, plan them on the cluster's free GPUs and run their worker pods. "
        "Settings come from STADI_OPERATOR_* environment variables; flags override them.",
    )
    op.add_argument("--namespace", action="append", metavar="NS",
                    help="watch this namespace (repeatable); default: STADI_OPERATOR_NAMESPACES or all")
    op.add_argument("--standalone", action=argparse.BooleanOptionalAction, default=True,
                    help="no peering with other operator replicas (default: on; one replica needs none)")
    op.add_argument("--liveness", type=int, metavar="PORT", help="serve /healthz on this port")
    op.set_defaults(func=run_operator)
    add_agent_parser(subparsers)
    register_dev_cluster(subparsers)
