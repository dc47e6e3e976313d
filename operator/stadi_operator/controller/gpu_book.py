"""GPU reservation: GPUs promised to worker pods this operator has just created, until kopf's pod index shows
them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stadi_operator.controller import inventory


@dataclass
class GpuBook:
    """GPUs promised to worker pods this operator has just created, until the pod index shows them.

    kopf runs the handlers of many jobs at once, and a pod reaches the index only after its watch event: jobs
    planned in that gap would all pick the same free GPUs. Launches take the lock, plan against the index plus
    these promises, and add their pods' promises; a promise lapses when the index shows its pod, when its job
    sees it finished or going (a short pod may end between two launches, never shown to a launch), or after ttl.
    """

    ttl_s: float = 120.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    promised: dict[tuple[str, str], tuple[str, inventory.PodUsage, float]] = field(default_factory=dict)

    def with_promises(self, pods: Mapping[str, Iterable[inventory.PodUsage]]) -> dict[str, list[inventory.PodUsage]]:
        """The pod index plus the promises it does not show yet (call with the lock held)."""
        merged = {node: list(store) for node, store in pods.items()}
        seen = {(u.namespace, u.name) for store in merged.values() for u in store}
        now = time.monotonic()
        for key, (node, usage, expiry) in list(self.promised.items()):
            if key in seen or expiry < now:
                del self.promised[key]
            else:
                merged.setdefault(node, []).append(usage)
        return merged

    def promise(self, pod: Mapping[str, Any]) -> None:
        """Hold a created pod's GPUs on the node it is pinned to (call with the lock held)."""
        found = inventory.pod_usage(pod)
        if found:
            node, usage = found
            self.promised[(usage.namespace, usage.name)] = (node, usage, time.monotonic() + self.ttl_s)

    def release(self, pods: Iterable[Mapping[str, Any]]) -> None:
        """Drop the promises of these pods (finished or being deleted: their GPUs are free or about to be)."""
        with self.lock:
            for pod in pods:
                meta = pod.get("metadata") or {}
                self.promised.pop((meta.get("namespace") or "", meta.get("name") or ""), None)
