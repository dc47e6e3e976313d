"""Real Kueue on the dev control plane: quota reservation and admission of plain Kueue Workloads (no stadi operator).

Kueue's admission webhooks for its own kinds are registered (:class:`DevCluster` with ``kueue=True``), pointed
at the manager on loopback; those of its job and pod integrations are not (they are off). The DiffusionJobs that
Kueue queues, admits and preempts are in test_jobs_queued.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from stadi_operator.devcluster.cluster import DevCluster

pytestmark = pytest.mark.slow

API = "kueue.x-k8s.io/v1beta2"  # the CRDs' storage version
NS = "team-a"
QUEUE = "gpus"


@pytest.fixture(scope="module")
def kueue_cluster(dev_cluster: DevCluster) -> Iterator[DevCluster]:
    """The session's control plane (Kueue runs in it), one ClusterQueue with 2 ``nvidia.com/gpu`` and a
    LocalQueue ``team-a/gpus`` pointing at it."""
    cluster = dev_cluster
    cluster.kubectl("create", "namespace", NS)
    cluster.apply(queue_objects("gpu-cq", NS, QUEUE, gpus=2))
    cluster.wait_for(lambda: _condition(cluster.kubectl_json("get", "clusterqueue", "gpu-cq"), "Active")
                     == "True", 30, "ClusterQueue gpu-cq Active")
    yield cluster
    cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def queue_objects(cluster_queue: str, namespace: str, local_queue: str, gpus: int,
                  preemption: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A ResourceFlavor, a ClusterQueue of ``gpus`` ``nvidia.com/gpu`` for every namespace, a LocalQueue to it."""
    return [
        {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}, "spec": {}},
        {"apiVersion": API, "kind": "ClusterQueue", "metadata": {"name": cluster_queue}, "spec": {
            "namespaceSelector": {},  # every namespace (a missing selector matches none)
            "resourceGroups": [{"coveredResources": ["nvidia.com/gpu"], "flavors": [
                {"name": "default-flavor", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": gpus}]}]}],
            **({"preemption": preemption} if preemption else {}),
        }},
        {"apiVersion": API, "kind": "LocalQueue", "metadata": {"name": local_queue, "namespace": namespace},
         "spec": {"clusterQueue": cluster_queue}},
    ]


def _workload(name: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": API, "kind": "Workload", "metadata": {"name": name, "namespace": NS},
        "spec": {"queueName": QUEUE, "podSets": [{"name": "main", "count": 1, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "worker", "image": "example.invalid/worker:1",
                            "resources": {"requests": {"nvidia.com/gpu": str(gpus)},
                                          "limits": {"nvidia.com/gpu": str(gpus)}}}],
        }}}]},
    }


def _condition(obj: dict[str, Any], kind: str) -> str | None:
    """The status ("True"/"False") of condition ``kind``, None when absent."""
    return next((c["status"] for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def _get(cluster: DevCluster, name: str) -> dict[str, Any]:
    return cluster.kubectl_json("get", "workloads.kueue.x-k8s.io", name, "-n", NS)


def _wait_admitted(cluster: DevCluster, name: str) -> dict[str, Any]:
    cluster.wait_for(lambda: _condition(_get(cluster, name), "Admitted") == "True", 30, f"Workload {name} Admitted")
    return _get(cluster, name)


def test_workloads_admitted_within_gpu_quota(kueue_cluster: DevCluster) -> None:
    cluster = kueue_cluster
    cluster.apply(_workload("one-gpu", 1))
    first = _wait_admitted(cluster, "one-gpu")
    admission = first["status"]["admission"]
    assert admission["clusterQueue"] == "gpu-cq"
    assert admission["podSetAssignments"][0]["flavors"] == {"nvidia.com/gpu": "default-flavor"}
    assert _condition(first, "QuotaReserved") == "True"

    # 1 of 2 GPUs is reserved: a Workload asking 2 waits, whatever the time it is given.
    cluster.apply(_workload("two-gpus", 2))
    cluster.wait_for(lambda: _condition(_get(cluster, "two-gpus"), "QuotaReserved") == "False", 30,
                     "Workload two-gpus evaluated (QuotaReserved=False)")
    time.sleep(3)
    second = _get(cluster, "two-gpus")
    assert _condition(second, "QuotaReserved") != "True" and "admission" not in second.get("status", {}), second

    # What a job integration does when its job ends: Finished=True releases the quota.
    finished = {"type": "Finished", "status": "True", "reason": "Succeeded", "message": "done",
                "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    patch = [{"op": "add", "path": "/status/conditions/-", "value": finished}]
    cluster.kubectl("patch", "workloads.kueue.x-k8s.io", "one-gpu", "-n", NS, "--subresource=status", "--type=json",
                    "-p", json.dumps(patch))
    second = _wait_admitted(cluster, "two-gpus")
    assert second["status"]["admission"]["clusterQueue"] == "gpu-cq"
    usage = cluster.kubectl_json("get", "clusterqueue", "gpu-cq")["status"]["flavorsReservation"][0]["resources"]
    assert {r["name"]: r["total"] for r in usage} == {"nvidia.com/gpu": "2"}



def test_kueues_admission_webhooks_are_reachable_from_the_api_server(kueue_cluster: DevCluster) -> None:
    """Only Kueue's own kinds are behind its webhooks, on loopback, and a failing call refuses the request
    (failurePolicy Fail): every Workload and queue this module created went through them."""
    for kind in ("mutating", "validating"):
        config = kueue_cluster.kubectl_json("get", f"{kind}webhookconfiguration", f"kueue-{kind}-webhook-configuration")
        hooks = config["webhooks"]
        assert {g for hook in hooks for rule in hook["rules"] for g in rule["apiGroups"]} == {"kueue.x-k8s.io"}
        assert {"workloads", "clusterqueues"} <= {r for hook in hooks for rule in hook["rules"]
                                                  for r in rule["resources"]}
        assert all(hook["clientConfig"]["url"].startswith("https://127.0.0.1:") and hook["failurePolicy"] == "Fail"
                   for hook in hooks)
