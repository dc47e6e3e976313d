"""The inventory join: Nodes minus used GPUs, with telemetry, as planner devices (pure, no kopf)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from stadi_operator.controller.inventory import (
    NodeInfo,
    PodUsage,
    Telemetry,
    claim_holds,
    free_devices,
    node_info,
    pod_usage,
    slice_gpus,
    telemetry,
    tolerates,
)

from stadi.api import Toleration
from stadi.planner import Device

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def node(name: str, product: str = "NVIDIA-H100-80GB-HBM3", gpus: int = 2, *, taints: list[Any] | None = None,
         ready: str = "True", unschedulable: bool = False, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product, "nvidia.com/gpu.memory": "81559",
                                              "kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": str(gpus)},
                   "conditions": [{"type": "Ready", "status": ready}]},
    }


def pod(name: str, node_name: str | None, gpus: int, phase: str = "Running", job: str | None = None,
        ns: str = "default") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": {"stadi.dev/job": job} if job else {}},
        "spec": {"nodeName": node_name, "containers": [
            {"name": "c", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}},
            {"name": "sidecar", "resources": {"requests": {"cpu": "1"}}},
        ]},
        "status": {"phase": phase},
    }


def gpunode(name: str, loads: list[float], updated: datetime = NOW) -> dict[str, Any]:
    return {
        "metadata": {"name": name}, "spec": {"nodeName": name},
        "status": {"updated": updated.isoformat(), "gpus": [
            {"index": i, "uuid": f"GPU-{i}", "product": "H100", "memoryTotalMib": 81559, "memoryUsedMib": 0,
             "utilization": load} for i, load in enumerate(loads)]},
    }


def join(nodes: list[dict[str, Any]], pods: list[dict[str, Any]] = (), gpunodes: list[dict[str, Any]] = (),
         **kwargs: Any) -> list[Device]:
    infos = [i for i in (node_info(n) for n in nodes) if i]
    used: dict[str, list[PodUsage]] = {}
    for p in pods:
        found = pod_usage(p)
        if found:
            used.setdefault(found[0], []).append(found[1])
    tele = {t.node: t for t in (telemetry(g) for g in gpunodes) if t}
    return free_devices(infos, used, tele, now=NOW, **kwargs)


def test_node_info_reads_gfd_labels_allocatable_and_readiness() -> None:
    info = node_info(node("gpu-a", gpus=4))
    assert info == NodeInfo(
        name="gpu-a", product="NVIDIA-H100-80GB-HBM3", memory_mib=81559, allocatable={"nvidia.com/gpu": 4},
        labels=info.labels, taints=(), schedulable=True, ready=True,
    )
    # every node is known: one without the product label may have GPUs published through DRA
    bare = node_info({"metadata": {"name": "cpu-only", "labels": {}}})
    assert (bare.product, bare.allocatable) == ("", {})
    assert join([{"metadata": {"name": "cpu-only", "labels": {}},
                  "status": {"conditions": [{"type": "Ready", "status": "True"}]}}]) == []


def test_every_free_gpu_becomes_a_device_with_its_node_and_index() -> None:
    devices = join([node("b", "NVIDIA-L4", 1), node("a", gpus=2)])
    assert devices == [Device("NVIDIA-H100-80GB-HBM3", 0.0, "a", 0), Device("NVIDIA-H100-80GB-HBM3", 0.0, "a", 1),
                       Device("NVIDIA-L4", 0.0, "b", 0)]


def test_gpus_held_by_running_pods_are_subtracted_and_finished_pods_are_not() -> None:
    pods = [pod("p1", "a", 1), pod("p2", "a", 1, phase="Succeeded"), pod("p3", "b", 4), pod("unbound", None, 2)]
    devices = join([node("a", gpus=4), node("b", gpus=4)], pods)
    assert [(d.node, d.index) for d in devices] == [("a", 0), ("a", 1), ("a", 2)]


def test_init_containers_count_by_the_schedulers_rule() -> None:
    body = pod("p", "a", 1)
    body["spec"]["initContainers"] = [{"name": "i", "resources": {"limits": {"nvidia.com/gpu": "3"}}}]
    assert pod_usage(body)[1].requests == {"nvidia.com/gpu": 3}


def test_the_jobs_own_leaving_pods_do_not_count() -> None:
    pods = [pod("mine", "a", 2, job="j1"), pod("other-ns", "a", 1, job="j1", ns="x")]
    devices = join([node("a", gpus=4)], pods, ignore_job=("default", "j1"))
    assert len(devices) == 3


def test_untolerated_noschedule_and_noexecute_taints_exclude_a_node() -> None:
    nodes = [
        node("a", taints=[{"key": "gpu", "value": "reserved", "effect": "NoSchedule"}]),
        node("b", taints=[{"key": "maint", "effect": "NoExecute"}]),
        node("c", taints=[{"key": "soft", "effect": "PreferNoSchedule"}]),
    ]
    assert {d.node for d in join(nodes)} == {"c"}
    tolerations = [Toleration(key="gpu", operator="Equal", value="reserved", effect="NoSchedule"),
                   Toleration(key="maint", operator="Exists")]
    assert {d.node for d in join(nodes, tolerations=tolerations)} == {"a", "b", "c"}


def test_toleration_matching_rules() -> None:
    taint = {"key": "k", "value": "v", "effect": "NoSchedule"}
    assert tolerates([Toleration(operator="Exists")], taint)  # empty key + Exists tolerates everything
    assert not tolerates([Toleration(key="k", value="other")], taint)
    assert not tolerates([Toleration(key="k", value="v", effect="NoExecute")], taint)
    assert tolerates([Toleration(key="k", value="v")], taint)


def test_cordoned_notready_selector_and_excluded_nodes_are_left_out() -> None:
    nodes = [node("cordoned", unschedulable=True), node("sick", ready="False"),
             node("other-pool", labels={"pool": "b"}), node("ok", labels={"pool": "a"}),
             node("bad", labels={"pool": "a"})]
    devices = join(nodes, node_selector={"pool": "a"}, exclude=["bad"])
    assert {d.node for d in devices} == {"ok"}


def test_fresh_telemetry_gives_loads_and_the_free_gpus_are_the_least_loaded() -> None:
    # 4 GPUs, one held by another pod: the busy GPU (index 2) is taken to be the held one.
    devices = join([node("a", gpus=4)], [pod("p", "a", 1)], [gpunode("a", [0.1, 0.0, 0.9, 0.5])])
    assert [(d.index, d.load) for d in devices] == [(0, 0.1), (1, 0.0), (3, 0.5)]


def test_stale_telemetry_is_ignored() -> None:
    old = gpunode("a", [0.9, 0.9], updated=NOW - timedelta(seconds=61))
    assert [d.load for d in join([node("a")], gpunodes=[old], stale_after=60)] == [0.0, 0.0]
    recent = gpunode("a", [0.9, 0.9], updated=NOW - timedelta(seconds=30))
    assert [d.load for d in join([node("a")], gpunodes=[recent], stale_after=60)] == [0.9, 0.9]


def test_telemetry_of_a_gpunode_without_timestamps_is_stale() -> None:
    body = gpunode("a", [0.5])
    del body["status"]["updated"]
    assert telemetry(body) == Telemetry("a", None, {0: 0.5})
    assert [d.load for d in join([node("a", gpus=1)], gpunodes=[body])] == [0.0]


def test_shared_gpus_offer_one_device_per_physical_gpu() -> None:
    # Time-slicing with 4 replicas: 2 physical GPUs advertise 8 allocatable units.
    shared = node("a", "NVIDIA-A100-SXM4-40GB-SHARED", gpus=8, labels={"nvidia.com/gpu.count": "2"})
    devices = join([shared])
    assert [(d.product, d.index) for d in devices] == [("NVIDIA-A100-SXM4-40GB-SHARED", 0),
                                                        ("NVIDIA-A100-SXM4-40GB-SHARED", 1)]
    assert devices[0].effective_speed() > 0


def test_mig_slices_are_devices_with_their_fraction_of_the_speed() -> None:
    mig = node("a", "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb", gpus=2)
    devices = join([mig, node("b", "NVIDIA-A100-SXM4-40GB", gpus=1)])
    assert [d.node for d in devices] == ["a", "a", "b"]
    assert devices[0].effective_speed() < devices[2].effective_speed()


def test_other_gpu_resource_names_are_counted_separately() -> None:
    n = node("a", gpus=2)
    n["status"]["allocatable"]["nvidia.com/mig-1g.10gb"] = "7"
    assert len(join([n], resource="nvidia.com/mig-1g.10gb")) == 7


def test_a_pending_pod_pinned_to_a_node_holds_its_gpus_there() -> None:
    """Another gang's pods, created but not yet bound, already count on the node they are pinned to: two
    jobs planned back to back must not both pick the same free GPUs."""
    waiting = pod("other-a1-0", None, 3, phase="Pending", job="other")
    waiting["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "a"}
    devices = join([node("a", gpus=4), node("b", gpus=1)], [waiting])
    assert [(d.node, d.index) for d in devices] == [("a", 0), ("b", 0)]


# --- GPUs published through DRA ----------------------------------------------------------------------------


def resource_slice(node_name: str, gpus: int, product: str = "NVIDIA H200", driver: str = "gpu.nvidia.com",
                   first: int = 0) -> dict[str, Any]:
    """A ResourceSlice as NVIDIA's DRA driver publishes one: a pool per node, one device per GPU."""
    return {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {"name": f"{node_name}-gpus"},
        "spec": {"driver": driver, "nodeName": node_name, "pool": {"name": node_name, "generation": 1,
                                                                    "resourceSliceCount": 1},
                 "devices": [{"name": f"gpu-{i}", "attributes": {
                     "index": {"int": i}, "productName": {"string": product},
                     "uuid": {"string": f"GPU-{node_name}-{i}"}, "architecture": {"string": "Hopper"}},
                     "capacity": {"memory": {"value": "143771Mi"}}}
                     for i in range(first, first + gpus)]},
    }


def claim(pool: str, devices: list[str], driver: str = "gpu.nvidia.com") -> dict[str, Any]:
    return {"status": {"allocation": {"devices": {"results": [
        {"request": "gpus", "driver": driver, "pool": pool, "device": d} for d in devices]}}}}


def dra_join(nodes: list[dict[str, Any]], slices: list[dict[str, Any]], claims: list[dict[str, Any]] = (),
             pods: list[dict[str, Any]] = (), **kwargs: Any) -> list[Device]:
    published: dict[str, list[Any]] = {}
    for found in filter(None, map(slice_gpus, slices)):
        published.setdefault(found[0], []).extend(found[1])
    held: dict[str, list[str]] = {}
    for c in claims:
        for pool, names in claim_holds(c).items():
            held.setdefault(pool, []).extend(names)
    return join(nodes, pods, slices=published, claimed=held, **kwargs)


def test_a_slice_of_the_gpu_driver_lists_its_gpus_with_index_product_and_memory() -> None:
    node_name, gpus = slice_gpus(resource_slice("dra-a", 2))
    assert node_name == "dra-a" and [(g.name, g.pool, g.index, g.product, g.memory_mib) for g in gpus] == [
        ("gpu-0", "dra-a", 0, "NVIDIA H200", 143771), ("gpu-1", "dra-a", 1, "NVIDIA H200", 143771)]
    assert slice_gpus(resource_slice("dra-a", 2, driver="other.example.com")) is None
    unnamed = resource_slice("dra-a", 1)
    del unnamed["spec"]["nodeName"]
    assert slice_gpus(unnamed) is None
    assert claim_holds(claim("dra-a", ["gpu-1"])) == {"dra-a": ("gpu-1",)}
    assert claim_holds(claim("dra-a", ["nic-0"], driver="nic.example.com")) == {}
    assert claim_holds({"status": {}}) == {}


def test_dra_gpus_are_free_unless_a_claim_or_a_planned_pod_holds_them() -> None:
    """A node of a DRA driver without GFD labels or the extended resource: its slice's GPUs, by index and
    product; minus the device an allocated claim holds, and the indices a worker pod of ours is planned on
    before its claim is allocated."""
    bare = {"metadata": {"name": "dra-a", "labels": {"kubernetes.io/hostname": "dra-a"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    found = dra_join([bare], [resource_slice("dra-a", 4)], [claim("dra-a", ["gpu-1"])])
    assert [(d.product, d.node, d.index) for d in found] == [("NVIDIA H200", "dra-a", i) for i in (0, 2, 3)]
    ours = {"metadata": {"name": "w", "namespace": "jobs", "labels": {"stadi.dev/job": "j"},
                         "annotations": {"stadi.dev/gpu-indices": "2,3"}},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": "dra-a"}, "containers": [{"name": "worker"}]},
            "status": {"phase": "Pending"}}
    found = dra_join([bare], [resource_slice("dra-a", 4)], [claim("dra-a", ["gpu-1"])], [ours])
    assert [d.index for d in found] == [0]
    # the job being re-planned does not hold its own leaving pods' devices
    found = dra_join([bare], [resource_slice("dra-a", 4)], [], [ours], ignore_job=("jobs", "j"))
    assert [d.index for d in found] == [0, 1, 2, 3]


def test_a_node_with_both_sources_is_counted_once_from_its_slices() -> None:
    """GFD labels and nvidia.com/gpu (the device plugin) next to a DRA slice of the same 2 GPUs: 2 devices, not 4;
    a node of the device plugin only still counts from its allocatable."""
    found = dra_join([node("both", gpus=2), node("plugin", gpus=2)], [resource_slice("both", 2)])
    assert [(d.node, d.index) for d in found] == [("both", 0), ("both", 1), ("plugin", 0), ("plugin", 1)]
    assert {d.product for d in found if d.node == "both"} == {"NVIDIA H200"}
