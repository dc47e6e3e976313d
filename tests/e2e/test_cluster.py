"""The e2e control plane itself: fake GPU nodes, the real scheduler binding GPU pods, kwok's pod stages, RBAC."""

from __future__ import annotations

import json

import pytest
from stadi_operator.devcluster.cluster import DevCluster
from stadi_operator.devcluster.nodes import DEFAULT_NODES

pytestmark = pytest.mark.slow


def test_fake_gpu_nodes_listed_with_products(dev_cluster: DevCluster) -> None:
    out = dev_cluster.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product", "--no-headers").stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    expected = {n.name: n.product for n in DEFAULT_NODES}
    assert set(rows) == set(expected)
    for name, product in expected.items():
        assert rows[name][1] == "Ready", rows[name]
        assert rows[name][-1] == product
    assert sorted(expected.values()).count("NVIDIA-H100-80GB-HBM3") == 2
    assert "Tesla-T4-SHARED" in expected.values()
    node = dev_cluster.kubectl_json("get", "node", "gpu-h100-0")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["labels"]["nvidia.com/gpu.memory"] == "81559"
    assert node["metadata"]["labels"]["nvidia.com/gpu.count"] == "8"


def _gpu_pod(name: str, gpus: int) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "restartPolicy": "Never",
            "containers": [{"name": "worker", "image": "example.invalid/worker:1",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        },
    }


def _phase(cluster: DevCluster, ns: str, name: str) -> str:
    return cluster.kubectl("get", "pod", name, "-n", ns, "-o", "jsonpath={.status.phase}").stdout


@pytest.mark.parametrize("result", ["Succeeded", "Failed"])
def test_gpu_pod_scheduled_runs_and_ends_on_annotation(dev_cluster: DevCluster, namespace: str, result: str) -> None:
    dev_cluster.apply(_gpu_pod("w0", 2), "-n", namespace)
    dev_cluster.wait_for(lambda: _phase(dev_cluster, namespace, "w0") == "Running", 30, "pod Running")
    pod = dev_cluster.kubectl_json("get", "pod", "w0", "-n", namespace)
    assert pod["spec"]["nodeName"] in {"gpu-h100-0", "gpu-h100-1"}
    assert pod["status"]["podIP"]
    events = dev_cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=w0",
                                 "-o", "jsonpath={.items[*].reason}").stdout
    assert "Scheduled" in events.split()  # bound by the real kube-scheduler, not by kwok
    dev_cluster.kubectl("annotate", "pod", "w0", "-n", namespace, f"stadi.dev/fake-result={result}")
    dev_cluster.wait_for(lambda: _phase(dev_cluster, namespace, "w0") == result, 30, f"pod {result}")
    state = dev_cluster.kubectl_json("get", "pod", "w0", "-n", namespace)["status"]["containerStatuses"][0]["state"]
    assert state["terminated"]["exitCode"] == (0 if result == "Succeeded" else 1)


def test_pod_asking_more_gpus_than_any_node_stays_pending(dev_cluster: DevCluster, namespace: str) -> None:
    dev_cluster.apply(_gpu_pod("too-big", 9), "-n", namespace)

    def unschedulable() -> bool:
        pod = dev_cluster.kubectl_json("get", "pod", "too-big", "-n", namespace)
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                   for c in pod["status"].get("conditions", []))

    dev_cluster.wait_for(unschedulable, 30, "PodScheduled=False/Unschedulable")
    assert _phase(dev_cluster, namespace, "too-big") == "Pending"


def test_rbac_enforced_for_service_account(dev_cluster: DevCluster, namespace: str) -> None:
    dev_cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    cfg = dev_cluster.sa_kubeconfig("nobody", namespace)
    denied = dev_cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=cfg, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower() and f"system:serviceaccount:{namespace}:nobody" in denied.stderr
    # Granting a Role makes exactly that allowed, and nothing else.
    dev_cluster.kubectl("create", "role", "pod-reader", "-n", namespace, "--verb=get,list", "--resource=pods")
    dev_cluster.kubectl("create", "rolebinding", "nobody-reads", "-n", namespace, "--role=pod-reader",
                        f"--serviceaccount={namespace}:nobody")
    dev_cluster.wait_for(lambda: dev_cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=cfg,
                                                     check=False).returncode == 0, 10, "RBAC grant")
    assert dev_cluster.kubectl("get", "secrets", "-n", namespace, kubeconfig=cfg, check=False).returncode != 0
    review = dev_cluster.kubectl("auth", "can-i", "list", "nodes", kubeconfig=cfg, check=False)
    assert review.stdout.strip() == "no"


def test_garbage_collector_deletes_owned_objects(dev_cluster: DevCluster, namespace: str) -> None:
    dev_cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = dev_cluster.kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
    child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "child", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}}
    dev_cluster.apply(json.dumps(child), "-n", namespace)
    dev_cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    dev_cluster.wait_for(lambda: dev_cluster.kubectl("get", "configmap", "child", "-n", namespace,
                                                     check=False).returncode != 0, 30, "child garbage-collected")
