"""Fake GPU nodes for kwok: Node objects labelled as NVIDIA's GPU feature discovery (GFD) would label them.

kwok manages only nodes annotated ``kwok.x-k8s.io/node: fake`` (see :data:`KWOK_ANNOTATION`), keeps them Ready
with leases, and runs the pods bound to them through the Stages of ``stages.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KWOK_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"
COUNT_LABEL = "nvidia.com/gpu.count"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class GPUNodeSpec:
    """One fake node: ``gpus`` physical GPUs of ``product`` (GFD's label value) with ``memory_mib`` each.

    ``replicas`` > 1 models the device plugin's time-slicing: GFD then appends ``-SHARED`` to the product,
    the node advertises ``gpus * replicas`` ``nvidia.com/gpu`` while ``nvidia.com/gpu.count`` stays physical.

    ``dra``: the node's GPUs are published through Dynamic Resource Allocation instead, as NVIDIA's DRA driver
    does (``resource_slice``: ``product`` is then the driver's ``productName``, e.g. "NVIDIA H200"), with no device
    plugin and no GFD labels. ``labels`` and ``taints`` are added to the Node as given.
    """

    name: str
    product: str
    gpus: int
    memory_mib: int
    replicas: int = 1
    cpu: str = "96"
    memory: str = "1Ti"
    dra: bool = False
    labels: tuple[tuple[str, str], ...] = ()
    taints: tuple[tuple[str, str, str], ...] = ()  # (key, value, effect)

    def manifest(self) -> dict[str, Any]:
        """The Node object (status included: kwok's node-initialize stage keeps capacity/allocatable as given)."""
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            **dict(self.labels),
        }
        resources = {"cpu": self.cpu, "memory": self.memory, "pods": "110"}
        if not self.dra:
            labels |= {"nvidia.com/gpu.present": "true", PRODUCT_LABEL: self.product,
                       MEMORY_LABEL: str(self.memory_mib), COUNT_LABEL: str(self.gpus)}
            resources[GPU_RESOURCE] = str(self.gpus * self.replicas)
        if self.replicas > 1:
            labels["nvidia.com/gpu.replicas"] = str(self.replicas)
            labels["nvidia.com/gpu.sharing-strategy"] = "time-slicing"
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": labels,
                "annotations": {KWOK_ANNOTATION[0]: KWOK_ANNOTATION[1], "node.alpha.kubernetes.io/ttl": "0"},
            },
            "spec": {"taints": [{"key": k, "value": v, "effect": e} for k, v, e in self.taints]},
            "status": {"capacity": resources, "allocatable": dict(resources)},
        }

    def resource_slice(self) -> dict[str, Any]:
        """The ResourceSlice NVIDIA's DRA driver publishes for this node: one pool named after the node, one
        device per GPU with its index, product, UUID and memory."""
        devices = [{
            "name": f"gpu-{i}",
            "attributes": {"index": {"int": i}, "productName": {"string": self.product},
                           "uuid": {"string": f"GPU-{self.name}-{i}"}, "type": {"string": "gpu"}},
            "capacity": {"memory": {"value": f"{self.memory_mib}Mi"}},
        } for i in range(self.gpus)]
        return {
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": f"{self.name}-{DRA_DRIVER}"},
            "spec": {"driver": DRA_DRIVER, "nodeName": self.name, "devices": devices,
                     "pool": {"name": self.name, "generation": 1, "resourceSliceCount": 1}},
        }


# NVIDIA's DRA driver and the DeviceClass it installs for whole GPUs
DRA_DRIVER = "gpu.nvidia.com"
DEVICE_CLASS: dict[str, Any] = {
    "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": DRA_DRIVER},
    "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{DRA_DRIVER}"'}}]},
}


def dra_objects(specs: list[GPUNodeSpec]) -> list[dict[str, Any]]:
    """The DeviceClass, then each DRA node and its ResourceSlice, for ``kubectl apply``."""
    return [DEVICE_CLASS, *(o for s in specs if s.dra for o in (s.manifest(), s.resource_slice()))]


H100 = ("NVIDIA-H100-80GB-HBM3", 81559)
A100 = ("NVIDIA-A100-SXM4-80GB", 81920)
L4 = ("NVIDIA-L4", 23034)
T4 = ("Tesla-T4", 15360)

#: The dev cluster's fleet: two 8×H100, one 4×A100, one 4×L4, one T4 time-sliced 4 ways (``Tesla-T4-SHARED``).
DEFAULT_NODES: tuple[GPUNodeSpec, ...] = (
    GPUNodeSpec("gpu-h100-0", H100[0], 8, H100[1], cpu="192", memory="2Ti"),
    GPUNodeSpec("gpu-h100-1", H100[0], 8, H100[1], cpu="192", memory="2Ti"),
    GPUNodeSpec("gpu-a100-0", A100[0], 4, A100[1]),
    GPUNodeSpec("gpu-l4-0", L4[0], 4, L4[1], cpu="48", memory="192Gi"),
    GPUNodeSpec("gpu-t4-0", T4[0] + "-SHARED", 1, T4[1], replicas=4, cpu="16", memory="64Gi"),
)


#: ``stadi dev-cluster up --dra``: nodes whose GPUs only NVIDIA's DRA driver publishes (its product names).
DRA_NODES: tuple[GPUNodeSpec, ...] = (
    GPUNodeSpec("dra-h200-0", "NVIDIA H200", 8, 143771, dra=True),
    GPUNodeSpec("dra-a100-0", "NVIDIA A100-SXM4-80GB", 4, 81920, dra=True),
)


def mixed_fleet(n: int, prefix: str = "fake-gpu") -> list[GPUNodeSpec]:
    """``n`` nodes cycling through H100×8, A100×4, L4×4 and T4-SHARED (for scale tests)."""
    kinds = [(H100, 8, 1), (A100, 4, 1), (L4, 4, 1), (T4, 1, 4)]
    out = []
    for i in range(n):
        (product, mem), gpus, replicas = kinds[i % len(kinds)]
        name = product + "-SHARED" if replicas > 1 else product
        out.append(GPUNodeSpec(f"{prefix}-{i:04d}", name, gpus, mem, replicas=replicas))
    return out


def node_list(specs: tuple[GPUNodeSpec, ...] | list[GPUNodeSpec] = DEFAULT_NODES) -> dict[str, Any]:
    """A ``v1/List`` of the nodes, ready for ``kubectl apply -f -`` (JSON is YAML)."""
    return {"apiVersion": "v1", "kind": "List", "items": [s.manifest() for s in specs]}
