"""What a worker pod's object says: its phase, attempt, node, and why it failed or cannot be scheduled (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from stadi_operator.controller import children as ch
from stadi_operator.controller.status import parse_time


def phase(pod: Mapping[str, Any]) -> str:
    """The pod's phase; Pending until the kubelet reports one."""
    return str((pod.get("status") or {}).get("phase") or "Pending")


def terminating(pod: Mapping[str, Any]) -> bool:
    """Whether the pod is being deleted."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def attempt_of(pod: Mapping[str, Any]) -> int:
    """The attempt a worker pod belongs to (its label); -1 when it has none."""
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(ch.LABEL_ATTEMPT, -1))
    except ValueError:
        return -1


def node_of(pod: Mapping[str, Any]) -> str:
    """The node the pod is bound to, else the node it was planned for, else "?"."""
    return str((pod.get("spec") or {}).get("nodeName")
               or ((pod.get("metadata") or {}).get("annotations") or {}).get(ch.ANNOTATION_NODE, "?"))


def unschedulable_since(pod: Mapping[str, Any]) -> datetime | None:
    """When the scheduler last found no room for a pending pod, if it did."""
    if phase(pod) != "Pending":
        return None
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return parse_time(c.get("lastTransitionTime"))
    return None


def why_failed(pod: Mapping[str, Any]) -> str:
    """The clearest reason a pod failed: the container's termination, else the pod's."""
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            text = f"{term.get('reason') or 'Error'} (exit code {term.get('exitCode')})"
            return f"{text}: {term['message']}" if term.get("message") else text
    return ": ".join(x for x in (status.get("reason"), status.get("message")) if x) or "failed"
