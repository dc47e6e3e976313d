"""Scale (issue 7 item 6): 1000 kwok GPU nodes of mixed products, 100 DiffusionJobs applied at once.

A benchmark, not a timed assertion: it asserts that every job gets planned and all of its pods created, and
records how long that took (and how long until every pod ran) in ``bench/results/scale-kwok.json``. It starts
its own control plane (not the e2e session's), installs the chart cluster-wide (``operator.watchNamespaces``
empty, so the ClusterRole path of the chart is what the operator gets) and runs ``stadi operator`` as a local
process with the chart's ServiceAccount token. Takes minutes, so it runs only when asked::

    STADI_SCALE=1 .venv/bin/python -m pytest bench/test_scale.py -s
    .venv/bin/python -m pytest bench/test_scale.py --benchmark-enable -s
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "stadi"
RESULT = ROOT / "bench" / "results" / "scale-kwok.json"
NODES = 1000
JOBS = 100
NAMESPACE = "scale"
SYSTEM_NS = "stadi-system"
CREATE_TIMEOUT = 900.0
RUN_TIMEOUT = 300.0


def enabled(config: pytest.Config) -> bool:
    return os.environ.get("STADI_SCALE") == "1" or bool(config.getoption("benchmark_enable", default=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job_manifests(count: int) -> list[dict[str, Any]]:
    """``count`` jobs cycling through the examples' shapes (SDXL and SD3, auto/patch/stadi, 1-8 GPUs)."""
    examples = [yaml.safe_load((ROOT / "manifests" / "examples" / f"{name}.yaml").read_text())
                for name in ("sdxl", "sd3", "sdxl-patch", "tiny-sdxl")]
    jobs = []
    for i in range(count):
        doc = json.loads(json.dumps(examples[i % len(examples)]))
        doc["metadata"] = {"name": f"scale-{i:03d}", "namespace": NAMESPACE}
        if i % 5 == 4:  # some bigger heterogeneous gangs
            doc["spec"]["parallelism"] = {"strategy": "stadi", "gpus": {"min": 2, "max": 8}}
        jobs.append(doc)
    return jobs


def kubectl_json(cluster: Any, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json", timeout=120).stdout)


def snapshot(cluster: Any) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    jobs = {j["metadata"]["name"]: j.get("status") or {}
            for j in kubectl_json(cluster, "get", "diffusionjobs", "-n", NAMESPACE)["items"]}
    pods = kubectl_json(cluster, "get", "pods", "-n", NAMESPACE, "-l", "stadi.dev/job")["items"]
    return jobs, pods


def expected_pods(status: dict[str, Any]) -> int:
    plan = status.get("plan") or {}
    return len({r.get("node") for r in plan.get("ranks") or []})


def current_pods(status: dict[str, Any], pods: list[dict[str, Any]], job: str) -> list[dict[str, Any]]:
    attempt = str(status.get("attempts", 0))
    return [p for p in pods if p["metadata"]["labels"].get("stadi.dev/job") == job
            and p["metadata"]["labels"].get("stadi.dev/attempt") == attempt
            and not p["metadata"].get("deletionTimestamp")]


@pytest.fixture(scope="module")
def scale_cluster(request: pytest.FixtureRequest) -> Iterator[Any]:
    if not enabled(request.config):
        pytest.skip("scale benchmark: set STADI_SCALE=1 or pass --benchmark-enable")
    from stadi_operator.devcluster import testbin
    from stadi_operator.devcluster.cluster import DevCluster

    if not testbin.ready():
        pytest.skip(f"test binaries missing in {testbin.testbin_dir()} (make testbin)")
    cluster = DevCluster(nodes=(), log=print)
    cluster.start(timeout=180)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_scale_1000_nodes_100_jobs(scale_cluster: Any, tmp_path: Path) -> None:
    from stadi_operator.devcluster.nodes import mixed_fleet, node_list

    cluster = scale_cluster
    t_begin = time.monotonic()
    helm = subprocess.run(
        [str(cluster.bin / "helm"), "install", "stadi", str(CHART), "--namespace", SYSTEM_NS, "--create-namespace",
         "--set", "operator.enabled=false", "--set", "agent.enabled=false", "--set", "operator.volcano=off"],
        capture_output=True, text=True, env=cluster.env(), timeout=300, check=False)
    assert helm.returncode == 0, helm.stderr
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/diffusionjobs.stadi.dev")
    cluster.kubectl("create", "namespace", NAMESPACE)

    fleet = mixed_fleet(NODES)
    t_nodes = time.monotonic()
    for start in range(0, NODES, 250):
        cluster.kubectl("create", "-f", "-", input=json.dumps(node_list(fleet[start:start + 250])), timeout=300)

    def nodes_ready() -> int:
        out = cluster.kubectl("get", "nodes", "--no-headers", timeout=120).stdout
        return sum(1 for line in out.splitlines() if line.split()[1] == "Ready")

    cluster.wait_for(lambda: nodes_ready() == NODES, 600, f"{NODES} kwok nodes Ready")
    nodes_seconds = time.monotonic() - t_nodes
    print(f"{NODES} nodes Ready in {nodes_seconds:.1f} s")

    kubeconfig = cluster.sa_kubeconfig("stadi-operator", SYSTEM_NS, path=tmp_path / "operator.kubeconfig")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "STADI_OPERATOR_"))}
    env.update({"KUBECONFIG": str(kubeconfig), "STADI_OPERATOR_VOLCANO": "off",
                "STADI_OPERATOR_RECONCILE_INTERVAL": "2", "STADI_OPERATOR_UNSCHEDULABLE_TIMEOUT": "120"})
    log = tmp_path / "operator.log"
    with log.open("ab") as out:
        operator = subprocess.Popen([str(Path(sys.executable).with_name("stadi")), "operator", "--liveness",
                                     str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
    try:
        def healthy() -> bool:
            assert operator.poll() is None, log.read_text()[-3000:]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                return bool(response.status == 200)

        cluster.wait_for(healthy, 120, "operator /healthz")
        jobs = job_manifests(JOBS)
        t0 = time.monotonic()
        cluster.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": jobs}),
                        timeout=300)
        applied = time.monotonic() - t0
        all_planned = all_created = all_running = None
        last: tuple[dict[str, dict[str, Any]], list[dict[str, Any]]] = ({}, [])
        while time.monotonic() - t0 < CREATE_TIMEOUT + RUN_TIMEOUT:
            assert operator.poll() is None, log.read_text()[-3000:]
            statuses, pods = last = snapshot(cluster)
            now = time.monotonic() - t0
            planned = [n for n, s in statuses.items() if s.get("plan")]
            if all_planned is None and len(planned) == JOBS:
                all_planned = now
            created = [n for n in planned if len(current_pods(statuses[n], pods, n)) == expected_pods(statuses[n])]
            if all_created is None and len(created) == JOBS:
                all_created = now
            running = [n for n in created if all(p["status"].get("phase") == "Running"
                                                  for p in current_pods(statuses[n], pods, n))]
            if all_created is not None and len(running) == JOBS:
                all_running = now
                break
            if all_created is None and now > CREATE_TIMEOUT:
                break
            if all_created is not None and now - all_created > RUN_TIMEOUT:
                break
            time.sleep(1.0)
        statuses, pods = last
        phases = Counter(s.get("phase", "Pending") for s in statuses.values())
        attempts = Counter(int(s.get("attempts", 0)) for s in statuses.values())
        products = Counter(r["gpu"] for s in statuses.values() for r in (s.get("plan") or {}).get("ranks") or [])
        pending = [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Pending"
                   and not p["metadata"].get("deletionTimestamp")]
        result = {
            "benchmark": "scale-kwok",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
            "kubernetes": json.loads(cluster.kubectl("version", "-o", "json").stdout)
            .get("serverVersion", {}).get("gitVersion"),
            "nodes": NODES,
            "node_products": dict(Counter(n.product for n in fleet)),
            "jobs": JOBS,
            "seconds": {
                "nodes_ready": round(nodes_seconds, 2),
                "apply": round(applied, 2),
                "all_planned": None if all_planned is None else round(all_planned, 2),
                "all_pods_created": None if all_created is None else round(all_created, 2),
                "all_pods_running": None if all_running is None else round(all_running, 2),
                "total_including_setup": round(time.monotonic() - t_begin, 2),
            },
            "pods": len([p for p in pods if not p["metadata"].get("deletionTimestamp")]),
            "pods_pending_at_end": len(pending),
            "gpus_planned": sum(products.values()),
            "gpus_by_product": dict(products),
            "phases_at_end": dict(phases),
            "attempts": {str(k): v for k, v in sorted(attempts.items())},
            "operator": {"reconcile_interval_s": 2, "unschedulable_timeout_s": 120, "mode": "cluster-wide"},
            "note": "time from `kubectl create` of all jobs; the operator plans each job on its inventory index, "
                    "plus the GPUs promised to pods it has created but the index does not show yet",
        }
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        assert all_planned is not None, f"not every job planned: {dict(phases)}\n{log.read_text()[-3000:]}"
        assert all_created is not None, f"not every job's pods created: {dict(phases)}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(operator.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            operator.wait(timeout=15)
        if operator.poll() is None:
            os.killpg(operator.pid, signal.SIGKILL)
