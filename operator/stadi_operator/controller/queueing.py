"""Kueue admission. A job labelled with a LocalQueue (``kueue.x-k8s.io/queue-name``, Kueue's own label; a
WorkloadPriorityClass by ``kueue.x-k8s.io/priority-class``) gets a Workload per attempt that says what its
worker pods will request; the pods are created only once Kueue has admitted it. An evicted Workload (preempted
by a job of higher priority, its queue stopped) stops the attempt and queues the next one; deleting the
Workload when its attempt ends hands its quota back. Kueue owns the Workload's status; we only read it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stadi_operator.controller import children as ch
from stadi_operator.controller.adoption import ensure
from stadi_operator.controller.runtime import Job

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


class QueueError(ValueError):
    """The job asks for a queue this cluster cannot give it (no Kueue, an unknown priority class)."""


def queue_of(body: Mapping[str, Any]) -> str | None:
    """The LocalQueue the job is labelled with, if any."""
    return ((body.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL) or None


def _condition(workload: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    for condition in ((workload or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def admitted(workload: Mapping[str, Any] | None) -> bool:
    """Whether Kueue admitted the Workload (quota reserved, admission checks passed)."""
    return _condition(workload, "Admitted") is not None and _condition(workload, "Evicted") is None


def eviction(workload: Mapping[str, Any] | None) -> str | None:
    """Kueue's reason and message when it evicted the Workload, else None."""
    found = _condition(workload, "Evicted")
    return None if found is None else f"{found.get('reason', 'Evicted')}: {found.get('message', '')}".rstrip(": ")


def ensure_workload(job: Job, queue: str, attempt: int, pods: list[dict[str, Any]]) -> dict[str, Any]:
    """The attempt's Workload, created unless it exists. Raises QueueError when Kueue is not served or the
    priority class the job names does not exist."""
    if not job.runtime.kueue:
        raise QueueError(f"metadata.labels[{QUEUE_LABEL}] names queue {queue!r}, but this cluster serves no "
                         "Kueue Workloads (kueue.x-k8s.io/v1beta2): install Kueue or remove the label")
    labels = (job.body.get("metadata") or {}).get("labels") or {}
    priority = None
    if name := labels.get(PRIORITY_LABEL):
        found = job.kube.get_cluster("WorkloadPriorityClass", name)
        if found is None:
            raise QueueError(f"metadata.labels[{PRIORITY_LABEL}]: no WorkloadPriorityClass {name!r}")
        priority = (name, int(found.get("value", 0)))
    desired = ch.workload(job.owner, queue, attempt, pods, priority, job.indexes.products)
    workload, _ = ensure(job.kube, desired, job.owner)
    return workload


def _current_name(job: Job) -> str | None:
    """The name of the current attempt's Workload, if the job is queued and has started an attempt."""
    attempt = int(job.status.get("attempts", 0))
    if queue_of(job.body) is None or not attempt or not job.runtime.kueue:
        return None
    return ch.workload_name(job.name, attempt)


def current(job: Job) -> dict[str, Any] | None:
    """The Workload of the job's current attempt, if the job is queued and it exists."""
    name = _current_name(job)
    return None if name is None else job.kube.get("Workload", job.namespace, name)


def release(job: Job) -> None:
    """Delete the current attempt's Workload (its attempt ended or stopped): Kueue hands its quota back."""
    if (name := _current_name(job)) is not None:
        job.kube.delete("Workload", job.namespace, name)
