"""kopf's inventory indexes (GPU nodes, GPU-holding pods, GPUNode telemetry) and the planner devices they offer a
job."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from stadi.api import DiffusionJob
from stadi.planner import Device
from stadi_operator.controller import inventory


def stadi_nodes(body: Mapping[str, Any], **_: Any) -> dict[str, inventory.NodeInfo] | None:
    """Index: GPU nodes by name."""
    info = inventory.node_info(body)
    return {info.name: info} if info else None


def stadi_gpu_pods(body: Mapping[str, Any], **_: Any) -> dict[str, inventory.PodUsage] | None:
    """Index: extended resources held by non-terminated pods, by node."""
    found = inventory.pod_usage(body)
    return {found[0]: found[1]} if found else None


def stadi_telemetry(body: Mapping[str, Any], **_: Any) -> dict[str, inventory.Telemetry] | None:
    """Index: GPUNode telemetry by node."""
    found = inventory.telemetry(body)
    return {found.node: found} if found else None


@dataclass(frozen=True)
class Indexes:
    """kopf's inventory indexes (or plain dicts of lists in tests)."""

    nodes: Mapping[str, Iterable[inventory.NodeInfo]]
    pods: Mapping[str, Iterable[inventory.PodUsage]]
    telemetry: Mapping[str, Iterable[inventory.Telemetry]]

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Indexes:
        """The indexes kopf passes to a handler, by the names of the index functions above."""
        return cls(kwargs.get(stadi_nodes.__name__) or {}, kwargs.get(stadi_gpu_pods.__name__) or {},
                   kwargs.get(stadi_telemetry.__name__) or {})

    def devices(self, job: DiffusionJob, exclude: Iterable[str], now: datetime, stale_after: float,
                pods: Mapping[str, Iterable[inventory.PodUsage]] | None = None) -> list[Device]:
        """The free GPUs the job's pods could use, as planner devices (``pods`` replaces the pod index)."""
        template = job.spec.template
        telemetry = {node: t for node, store in self.telemetry.items() for t in store}
        return inventory.free_devices(
            [n for store in self.nodes.values() for n in store], self.pods if pods is None else pods, telemetry,
            resource=template.gpu_resource, tolerations=template.tolerations, node_selector=template.node_selector,
            exclude=exclude, now=now, stale_after=stale_after,
            # This job's own pods are leaving (a failed attempt being replaced): their GPUs are about to be free.
            ignore_job=(job.metadata.namespace or "", job.metadata.name or ""),
        )
