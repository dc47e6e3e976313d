"""The cluster's free GPUs, as planner devices, joined with GPUNode telemetry (load per GPU), from either source:

- the device plugin: Nodes (GPU Feature Discovery labels, allocatable ``nvidia.com/gpu``, taints) minus what
  running pods request;
- Dynamic Resource Allocation: the ResourceSlices of the GPU driver (``GPU_DRIVER``, NVIDIA's), one device per
  GPU with its product, index and memory, minus the devices that ResourceClaims hold and those this operator's
  pods are planned on. A node whose GPUs a slice publishes is counted from the slice only, never from its
  allocatable as well.

Pure functions: kopf's indexes call :func:`node_info`, :func:`pod_usage`, :func:`telemetry`, :func:`slice_gpus`
and :func:`claim_holds` on each object and keep the results; :func:`free_devices` joins them when a job is
planned. No API calls here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kubernetes.utils import parse_quantity

from stadi import gpus
from stadi.api import Toleration
from stadi.planner import Device

PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"
COUNT_LABEL = "nvidia.com/gpu.count"
HOSTNAME_LABEL = "kubernetes.io/hostname"
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")
TERMINATED = ("Succeeded", "Failed")
# The NVIDIA DRA driver's name; its devices' attributes (productName, index, uuid) are qualified by it.
GPU_DRIVER = "gpu.nvidia.com"
# On a worker pod that claims its GPUs through DRA: the device indices it is planned on ("0,1"), so that its
# GPUs count as taken before the scheduler allocates its claim.
DRA_INDICES_ANNOTATION = "stadi.dev/gpu-indices"


@dataclass(frozen=True)
class NodeInfo:
    """What planning needs to know about one GPU node."""

    name: str
    product: str = ""  # GPU Feature Discovery's product label; "" on a node without one
    memory_mib: int | None = None
    allocatable: Mapping[str, int] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Mapping[str, Any], ...] = ()
    schedulable: bool = True
    ready: bool = True


@dataclass(frozen=True)
class PodUsage:
    """Extended resources a non-terminated pod holds on its node, and whose pod it is."""

    namespace: str
    name: str
    requests: Mapping[str, int]
    job: str | None = None  # the DiffusionJob of a worker pod (label stadi.dev/job)
    dra_indices: tuple[int, ...] = ()  # a worker pod claiming through DRA: the GPU indices it is planned on


@dataclass(frozen=True)
class DraGpu:
    """One GPU a ResourceSlice of ``GPU_DRIVER`` publishes."""

    name: str  # the device's name in its pool
    pool: str
    index: int
    product: str
    memory_mib: int | None = None


@dataclass(frozen=True)
class Learned:
    """A speed a finished job measured on one GPU of the node (a GPUNode's ``status.learned`` entry)."""

    index: int
    family: str
    resolution: str
    compiled: bool
    speed: float
    measured_at: datetime


@dataclass(frozen=True)
class Telemetry:
    """A GPUNode's utilization per GPU index, and when it was measured; the speeds finished jobs learned."""

    node: str
    updated: datetime | None
    loads: Mapping[int, float] = field(default_factory=dict)
    learned: tuple[Learned, ...] = ()


def quantity(text: Any) -> int:
    """An extended-resource quantity ("4", 4, "4000m") as a whole number; 0 when unreadable."""
    value = str(text).strip()
    try:
        if value.endswith("m"):
            return int(value[:-1]) // 1000
        return int(float(value))
    except ValueError:
        return 0


def node_info(body: Mapping[str, Any]) -> NodeInfo:
    """A Node as planning sees it (every node: one without the GPU product label may have GPUs published
    through DRA)."""
    meta = body.get("metadata") or {}
    labels = dict(meta.get("labels") or {})
    product = labels.get(PRODUCT_LABEL, "")
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    allocatable = {key: quantity(value) for key, value in (status.get("allocatable") or {}).items() if "/" in key}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    memory = labels.get(MEMORY_LABEL)
    return NodeInfo(
        name=meta["name"],
        product=product,
        memory_mib=int(memory) if memory and memory.isdigit() else None,
        allocatable=allocatable,
        labels=labels,
        taints=tuple(dict(t) for t in spec.get("taints") or []),
        schedulable=not spec.get("unschedulable", False),
        # A node without a Ready condition yet (just registered) is not ready either.
        ready=conditions.get("Ready") == "True",
    )


def pod_usage(body: Mapping[str, Any]) -> tuple[str, PodUsage] | None:
    """(node, usage) of a pod that holds devices; None for finished pods, pods without any, or pods bound to
    no node and pinned to none.

    A pod not yet bound but pinned to a node (`kubernetes.io/hostname` in its nodeSelector, as our worker
    pods are) counts on that node already: otherwise jobs planned while another gang waits for the scheduler
    would all pick the same free GPUs. The effective request is the larger of the containers' sum and any
    single init container (the scheduler's rule); for extended resources requests equal limits, and a limit
    alone implies the request.
    """
    spec = body.get("spec") or {}
    node = spec.get("nodeName") or (spec.get("nodeSelector") or {}).get("kubernetes.io/hostname")
    if not node or (body.get("status") or {}).get("phase") in TERMINATED:
        return None

    def wanted(container: Mapping[str, Any]) -> dict[str, int]:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        return {key: quantity(value) for key, value in merged.items() if "/" in key}

    total: dict[str, int] = {}
    for container in spec.get("containers") or []:
        for key, value in wanted(container).items():
            total[key] = total.get(key, 0) + value
    for container in spec.get("initContainers") or []:
        for key, value in wanted(container).items():
            total[key] = max(total.get(key, 0), value)
    total = {key: value for key, value in total.items() if value > 0}
    meta = body.get("metadata") or {}
    indices = tuple(int(i) for i in str((meta.get("annotations") or {}).get(DRA_INDICES_ANNOTATION, "")).split(",")
                    if i.strip().isdigit())
    if not total and not indices:
        return None
    job = (meta.get("labels") or {}).get("stadi.dev/job")
    return node, PodUsage(str(meta.get("namespace") or ""), str(meta.get("name") or ""), total, job, indices)


def _attribute(device: Mapping[str, Any], name: str) -> Any:
    """A device attribute's value (``{"string": ...}``, ``{"int": ...}``), by bare or driver-qualified name."""
    attributes = device.get("attributes") or {}
    found = attributes.get(name) or attributes.get(f"{GPU_DRIVER}/{name}") or {}
    return next(iter(found.values()), None) if isinstance(found, Mapping) else None


def slice_gpus(body: Mapping[str, Any]) -> tuple[str, tuple[DraGpu, ...]] | None:
    """(node, GPUs) of a ResourceSlice of ``GPU_DRIVER`` on one node; None for other drivers, slices of no
    node, and devices without an index or product (not whole GPUs: MIG partitions come later)."""
    spec = body.get("spec") or {}
    node = spec.get("nodeName")
    if spec.get("driver") != GPU_DRIVER or not node:
        return None
    pool = str((spec.get("pool") or {}).get("name") or node)
    found = []
    for device in spec.get("devices") or []:
        index, product = _attribute(device, "index"), _attribute(device, "productName")
        if not isinstance(index, int) or not product:
            continue
        memory = ((device.get("capacity") or {}).get("memory") or {}).get("value")
        found.append(DraGpu(str(device.get("name")), pool, index, str(product), _mebibytes(memory)))
    return (node, tuple(found)) if found else None


def _mebibytes(text: Any) -> int | None:
    """A memory quantity ("80Gi", "81559Mi", bytes) in MiB; None when absent or unreadable."""
    try:
        return int(parse_quantity(text)) // 2 ** 20 if text else None
    except ValueError:
        return None


def claim_holds(body: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """The devices of ``GPU_DRIVER`` a ResourceClaim's allocation holds, by pool (empty when it holds none)."""
    results = (((body.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results") or []
    held: dict[str, tuple[str, ...]] = {}
    for r in results:
        if r.get("driver") == GPU_DRIVER and r.get("pool") and r.get("device"):
            held[str(r["pool"])] = (*held.get(str(r["pool"]), ()), str(r["device"]))
    return held


def _timestamp(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def telemetry(body: Mapping[str, Any]) -> Telemetry | None:
    """A GPUNode's per-index utilization (0..1); None when it names no node."""
    node = (body.get("spec") or {}).get("nodeName") or (body.get("metadata") or {}).get("name")
    if not node:
        return None
    status = body.get("status") or {}
    loads: dict[int, float] = {}
    stamps = [_timestamp(status.get("updated"))]
    for gpu in status.get("gpus") or []:
        if isinstance(gpu.get("index"), int):
            loads[gpu["index"]] = min(max(float(gpu.get("utilization") or 0.0), 0.0), 1.0)
            stamps.append(_timestamp(gpu.get("timestamp")))
    known = [s for s in stamps if s is not None]
    learned = tuple(
        Learned(int(e["index"]), str(e["family"]), str(e["resolution"]), bool(e.get("compiled")), float(e["speed"]),
                when)
        for e in status.get("learned") or []
        if isinstance(e.get("index"), int) and float(e.get("speed") or 0) > 0
        and (when := _timestamp(e.get("measuredAt"))) is not None)
    return Telemetry(node=node, updated=max(known) if known else None, loads=loads, learned=learned)


def tolerates(tolerations: Sequence[Toleration], taint: Mapping[str, Any]) -> bool:
    """Kubernetes toleration matching: effect (empty matches all), then key/operator/value."""
    for t in tolerations:
        if t.effect and t.effect != taint.get("effect"):
            continue
        if (t.operator or "Equal") == "Exists":
            if not t.key or t.key == taint.get("key"):
                return True
        elif t.key == taint.get("key") and (t.value or "") == (taint.get("value") or ""):
            return True
    return False


def usable(node: NodeInfo, tolerations: Sequence[Toleration], node_selector: Mapping[str, str]) -> bool:
    """Whether the job's pods could land on the node at all."""
    if not (node.ready and node.schedulable):
        return False
    if any(node.labels.get(key) != value for key, value in node_selector.items()):
        return False
    return all(
        tolerates(tolerations, taint) for taint in node.taints if taint.get("effect") in BLOCKING_EFFECTS
    )


def free_devices(
    nodes: Iterable[NodeInfo],
    used: Mapping[str, Iterable[PodUsage]],
    telemetry_by_node: Mapping[str, Telemetry],
    *,
    slices: Mapping[str, Iterable[DraGpu]] | None = None,
    claimed: Mapping[str, Iterable[str]] | None = None,
    resource: str = "nvidia.com/gpu",
    tolerations: Sequence[Toleration] = (),
    node_selector: Mapping[str, str] | None = None,
    exclude: Iterable[str] = (),
    now: datetime,
    stale_after: float = 60.0,
    ignore_job: tuple[str, str] | None = None,
) -> list[Device]:
    """One planner Device per free GPU, in node-name order.

    Free = allocatable `resource` minus what non-terminated pods on the node request. The device plugin, not
    the operator, picks which physical GPUs a pod gets, so when telemetry is fresh the free devices are taken to
    be the least-loaded GPU indices (the busy ones are most likely the ones other pods hold) and carry their
    load; stale or missing telemetry means load 0. A time-sliced product (``-SHARED``) offers at most one device
    per physical GPU: two ranks on slices of one GPU would only slow each other down. The pods of
    ``ignore_job`` (namespace, name) do not count: they belong to the attempt being replaced.

    A node with GPUs in ``slices`` (DRA, by node) offers exactly those devices (by their index and product) less
    the ones ResourceClaims hold (``claimed``: device names by pool) and the ones this operator's pods on the node
    are planned on (``PodUsage.dra_indices``), whatever its allocatable says.
    """
    excluded = set(exclude)
    selector = dict(node_selector or {})
    devices: list[Device] = []
    for node in sorted(nodes, key=lambda n: n.name):
        if node.name in excluded or not usable(node, tolerations, selector):
            continue
        pods = [u for u in used.get(node.name, ()) if ignore_job is None or (u.namespace, u.job) != ignore_job]
        tele = telemetry_by_node.get(node.name)
        fresh = tele is not None and tele.updated is not None and now - tele.updated <= timedelta(seconds=stale_after)
        loads = dict(tele.loads) if fresh and tele is not None else {}
        published = list((slices or {}).get(node.name, ()))
        if published:
            held = {name for g in published for name in (claimed or {}).get(g.pool, ())}
            planned = {i for u in pods for i in u.dra_indices}
            devices += [Device(g.product, loads.get(g.index, 0.0), node.name, g.index)
                        for g in sorted(published, key=lambda g: g.index)
                        if g.name not in held and g.index not in planned]
            continue
        if not node.product:
            continue
        free = node.allocatable.get(resource, 0) - sum(u.requests.get(resource, 0) for u in pods)
        if free <= 0:
            continue
        if gpus.resolve(node.product).shared:
            physical = quantity(node.labels.get(COUNT_LABEL, 0)) or len(loads) or free
            free = min(free, physical)
        if loads:
            indices = sorted(loads, key=lambda i: (loads[i], i))[:free]
            indices += [i for i in range(max(loads) + 1, max(loads) + 1 + free - len(indices))]
        else:
            indices = list(range(free))
        devices += [Device(node.product, loads.get(i, 0.0), node.name, i) for i in sorted(indices)]
    return devices
