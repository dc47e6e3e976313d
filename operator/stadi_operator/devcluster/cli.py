"""``stadi dev-cluster prepare|up|down|status``: the e2e control plane with fake GPU nodes, for trying the
operator locally (no GPUs, no containers: kwok plays the kubelets)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from stadi_operator.devcluster import nodes as fake_nodes
from stadi_operator.devcluster import testbin
from stadi_operator.devcluster.cluster import REPO_CRDS, ClusterError, DevCluster, _alive, kill_group


def state_dir() -> Path:
    """``$STADI_DEV_CLUSTER_DIR``, else ``$STADI_CACHE/dev-cluster``: certs, kubeconfig, etcd data, logs and
    ``state.json`` (pids, ports)."""
    return Path(os.environ.get("STADI_DEV_CLUSTER_DIR") or testbin.cache_root() / "dev-cluster")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _state() -> dict[str, Any] | None:
    path = state_dir() / "state.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _running(state: dict[str, Any]) -> dict[str, bool]:
    return {name: _alive(pid) for name, pid in state.get("pids", {}).items()}


def cmd_prepare(args: argparse.Namespace) -> int:
    """Build or fetch the binaries (cached; seconds when already there)."""
    print(testbin.prepare())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Start the control plane in the background and print how to use it."""
    state = _state()
    if state and all(_running(state).values()):
        _say("dev cluster already running")
        _print_usage(Path(state["kubeconfig"]))
        return 0
    _stop(state)
    testbin.prepare()
    if args.kueue:
        testbin.prepare_kueue()
    crds = Path(args.crds) if args.crds else (REPO_CRDS if REPO_CRDS.is_dir() else None)
    fleet = (*fake_nodes.DEFAULT_NODES, *(fake_nodes.DRA_NODES if args.dra else ()))
    cluster = DevCluster(state_dir=state_dir(), detach=True, crds=crds, nodes=fleet, kueue=args.kueue, log=_say)
    try:
        cluster.start()
    except ClusterError as exc:
        _say(f"dev cluster failed to start: {exc}")
        cluster.stop()
        return 1
    _say(f"logs: {cluster.logs}/")
    if crds is None:
        _say("no CRDs installed (manifests/crds not found; pass --crds DIR)")
    _print_usage(cluster.kubeconfig)
    return 0


def _print_usage(kubeconfig: Path) -> None:
    _say(f"kubeconfig: {kubeconfig}\nkubectl and helm: {testbin.testbin_dir()}/\n"
         "try: kubectl get nodes -L nvidia.com/gpu.product; stadi operator")
    print(f"export KUBECONFIG={kubeconfig}")


def _stop(state: dict[str, Any] | None) -> None:
    if state:
        # Reverse start order: etcd last.
        for _name, pid in reversed(list(state.get("pids", {}).items())):
            kill_group(int(pid))
    shutil.rmtree(state_dir(), ignore_errors=True)


def cmd_down(args: argparse.Namespace) -> int:
    """Stop every process of the dev cluster and remove its state (etcd data included)."""
    state = _state()
    _stop(state)
    _say("dev cluster stopped" if state else "no dev cluster was running (state removed)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Processes alive, API server URL, kubeconfig; exit 0 only when everything runs."""
    state = _state()
    if not state:
        print("dev cluster: not running")
        return 1
    running = _running(state)
    for name, alive in running.items():
        print(f"{name:24} pid {state['pids'][name]:>7}  {'running' if alive else 'DEAD'}")
    print(f"server: {state['server']}\nkubeconfig: {state['kubeconfig']}")
    return 0 if all(running.values()) else 1


def add_parser(subparsers: Any) -> None:
    """Register ``dev-cluster`` with its four subcommands."""
    p = subparsers.add_parser(
        "dev-cluster", help="a local control plane with fake GPU nodes (kwok) to try the operator",
        description="etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on loopback, with fake "
        "H100/A100/L4/T4 nodes. Pods bound to them go Running; annotate one stadi.dev/fake-result=Succeeded "
        "(or Failed) to end it. Binaries are built once into $STADI_CACHE/testbin (long the first time).",
    )
    sub = p.add_subparsers(dest="dev_cluster_command", required=True)
    sub.add_parser("prepare", help="build or fetch the binaries").set_defaults(func=cmd_prepare)
    up = sub.add_parser("up", help="start in the background; prints `export KUBECONFIG=...`")
    up.add_argument("--crds", metavar="DIR", help="CRDs to install (default: the repository's manifests/crds)")
    up.add_argument("--kueue", action="store_true", help="also run Kueue (built once into the cache)")
    up.add_argument("--dra", action="store_true", help="also nodes whose GPUs only DRA ResourceSlices publish "
                    "(H200 and A100, NVIDIA's driver gpu.nvidia.com, with its DeviceClass)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop and remove its state").set_defaults(func=cmd_down)
    sub.add_parser("status", help="show whether it runs").set_defaults(func=cmd_status)
