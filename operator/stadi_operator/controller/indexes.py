"""kopf's inventory indexes (nodes, GPU-holding pods, GPUNode telemetry, DRA ResourceSlices and ResourceClaims) and
the planner devices they offer a job."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from stadi.api import DiffusionJob
from stadi.planner import Device
from stadi_operator.controller import inventory


def stadi_nodes(body: Mapping[str, Any], **_: Any) -> dict[str, inventory.NodeInfo]:
    """Index: nodes by name (GPU Feature Discovery's, or any whose GPUs a ResourceSlice publishes)."""
    info = inventory.node_info(body)
    return {info.name: info}


def stadi_gpu_pods(body: Mapping[str, Any], **_: Any) -> dict[str, inventory.PodUsage] | None:
    """Index: extended resources held by non-terminated pods, by node."""
    found = inventory.pod_usage(body)
    return {found[0]: found[1]} if found else None


def stadi_telemetry(body: Mapping[str, Any], **_: Any) -> dict[str, inventory.Telemetry] | None:
    """Index: GPUNode telemetry by node."""
    found = inventory.telemetry(body)
    return {found.node: found} if found else None


def stadi_gpu_slices(body: Mapping[str, Any], **_: Any) -> dict[str, tuple[inventory.DraGpu, ...]] | None:
    """Index: the GPUs DRA ResourceSlices publish, by node."""
    found = inventory.slice_gpus(body)
    return {found[0]: found[1]} if found else None


def stadi_gpu_claims(body: Mapping[str, Any], **_: Any) -> dict[str, tuple[str, ...]] | None:
    """Index: the GPU devices allocated ResourceClaims hold, by pool."""
    return inventory.claim_holds(body) or None


@dataclass(frozen=True)
class Indexes:
    """kopf's inventory indexes (or plain dicts of lists in tests)."""

    nodes: Mapping[str, Iterable[inventory.NodeInfo]]
    pods: Mapping[str, Iterable[inventory.PodUsage]]
    telemetry: Mapping[str, Iterable[inventory.Telemetry]]
    slices: Mapping[str, Iterable[tuple[inventory.DraGpu, ...]]] = field(default_factory=dict)
    claims: Mapping[str, Iterable[tuple[str, ...]]] = field(default_factory=dict)

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Indexes:
        """The indexes kopf passes to a handler, by the names of the index functions above."""
        return cls(*(kwargs.get(f.__name__) or {} for f in (stadi_nodes, stadi_gpu_pods, stadi_telemetry,
                                                              stadi_gpu_slices, stadi_gpu_claims)))

    @property
    def dra_nodes(self) -> frozenset[str]:
        """The nodes whose GPUs DRA publishes (their pods claim GPUs instead of requesting the resource)."""
        return frozenset(node for node, store in self.slices.items() if any(store))

    @property
    def products(self) -> dict[str, str]:
        """Node → its GPU Feature Discovery product label, where it has one."""
        return {n.name: n.product for store in self.nodes.values() for n in store if n.product}

    def devices(self, job: DiffusionJob, exclude: Iterable[str], now: datetime, stale_after: float,
                pods: Mapping[str, Iterable[inventory.PodUsage]] | None = None) -> list[Device]:
        """The free GPUs the job's pods could use, as planner devices (``pods`` replaces the pod index)."""
        template = job.spec.template
        telemetry = {node: t for node, store in self.telemetry.items() for t in store}
        slices = {node: [g for gpus in store for g in gpus] for node, store in self.slices.items()}
        claimed = {pool: [d for held in store for d in held] for pool, store in self.claims.items()}
        return inventory.free_devices(
            [n for store in self.nodes.values() for n in store], self.pods if pods is None else pods, telemetry,
            slices=slices, claimed=claimed,
            resource=template.gpu_resource, tolerations=template.tolerations, node_selector=template.node_selector,
            exclude=exclude, now=now, stale_after=stale_after,
            # This job's own pods are leaving (a failed attempt being replaced): their GPUs are about to be free.
            ignore_job=(job.metadata.namespace or "", job.metadata.name or ""),
        )
