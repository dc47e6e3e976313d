"""The pod lifecycle of a job: its current attempt's pods move the phase (Running, Succeeded), a failed or
unschedulable gang is retried without its nodes or fails the job, spec.suspend stops and resumes it, a Kueue
eviction stops it and queues the next attempt, and the deadline and TTL end it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException

from stadi.api import DiffusionJob, Plan
from stadi_operator.controller import children as ch
from stadi_operator.controller import inventory, learning, pods, queueing
from stadi_operator.controller.adoption import controlled_by
from stadi_operator.controller.launch import launch
from stadi_operator.controller.metrics import measured_over_predicted
from stadi_operator.controller.runtime import Job
from stadi_operator.controller.status import measured_image_seconds, parse_time, stamp


def owned_pods(job: Job) -> list[dict[str, Any]]:
    """The worker pods the job controls, of every attempt."""
    return [p for p in job.kube.list("Pod", job.namespace, {ch.LABEL_JOB: job.name})
            if controlled_by(p, job.owner.uid)]


def stop(job: Job, found: Iterable[Mapping[str, Any]]) -> int:
    """Delete the pods that still run (terminated ones stay for their logs). Returns how many."""
    stopped = 0
    for pod in found:
        if pods.phase(pod) not in inventory.TERMINATED and not pods.terminating(pod):
            stopped += job.kube.delete("Pod", job.namespace, pod["metadata"]["name"])
    return stopped


def fail(job: Job, reason: str, message: str, found: Iterable[Mapping[str, Any]] = ()) -> None:
    """Phase Failed for ``reason``: stop the pods, set the condition, post the event."""
    st = job.status
    stop(job, found)
    queueing.release(job)
    st.set(phase="Failed", completionTime=stamp(job.now))
    st.condition("Failed", "True", reason, message)
    job.event(reason, message, warning=True)
    job.runtime.metrics.failures.labels(reason).inc()


def suspend(job: Job, found: list[dict[str, Any]]) -> None:
    """Phase Suspended (spec.suspend): stop the current attempt's pods and its PodGroup; images already written
    stay in the output (the worker writes each whole), and the resume generates only the missing ones."""
    st = job.status
    if st.phase == "Suspended":
        return
    stop(job, found)
    job.runtime.book.release(found)
    queueing.release(job)
    attempt = int(st.get("attempts", 0))
    if job.runtime.volcano and attempt:
        job.kube.delete("PodGroup", job.namespace, ch.pod_group_name(job.name, attempt))
    # Said by the attempt, not by what this run deleted: the update handler and the timer may both see the job
    # running, and the second finds the pods already going.
    message = (f"spec.suspend is true: attempt {attempt}'s worker pod(s) stopped; the images written so far are "
               "kept, and the missing ones are generated when spec.suspend is set false" if attempt else
               "spec.suspend is true: no worker pods until it is set false")
    st.set(phase="Suspended")
    st.condition("Suspended", "True", "Suspended", message)
    if attempt:
        st.condition("Scheduled", "False", "Suspended", message)
    job.event("Suspended", message)


def resume(job: Job, spec_job: DiffusionJob) -> None:
    """Out of Suspended (spec.suspend set false): plan again on the GPUs free now and start a new attempt, one
    that backoffLimit does not count (``resumes``)."""
    st = job.status
    resumes = int(st.get("resumes", 0)) + (1 if int(st.get("attempts", 0)) else 0)
    st.set(phase="Planning", resumes=resumes, startTime=stamp(job.now))
    st.condition("Suspended", "False", "Resumed", "spec.suspend is false: planning on the GPUs free now")
    job.event("Resumed", "spec.suspend is false: planning again; images already written are skipped")
    if resumes:
        job.runtime.metrics.replans.labels("Resumed").inc()
    launch(job, spec_job)


def requeue_if_evicted(job: Job, spec_job: DiffusionJob) -> bool:
    """Kueue evicted the current attempt's Workload (preempted, its queue stopped): stop the pods and queue the
    next attempt, which backoffLimit does not count (``resumes``), as for a resume. True if it did."""
    st = job.status
    why = queueing.eviction(queueing.current(job))
    if why is None:
        return False
    found = owned_pods(job)
    stopped = stop(job, found)
    job.runtime.book.release(found)
    if job.runtime.volcano:
        job.kube.delete("PodGroup", job.namespace, ch.pod_group_name(job.name, int(st.get("attempts", 0))))
    message = (f"Kueue evicted attempt {st.get('attempts')} ({why}): {stopped} worker pod(s) stopped; the images "
               "written so far are kept, and the next attempt queues again")
    st.set(resumes=int(st.get("resumes", 0)) + 1, startTime=stamp(job.now))
    st.condition("Admitted", "False", "Evicted", message)
    st.condition("Scheduled", "False", "Evicted", message)
    job.event("Evicted", message, warning=True)
    job.runtime.metrics.replans.labels("Evicted").inc()
    launch(job, spec_job)
    return True


def retry(job: Job, spec_job: DiffusionJob, nodes: Iterable[str], reason: str, message: str,
          found: list[dict[str, Any]]) -> None:
    """Replace the current attempt: stop its pods, exclude the nodes at fault, plan again (or fail)."""
    st = job.status
    stop(job, found)
    if job.runtime.volcano:
        job.kube.delete("PodGroup", job.namespace, ch.pod_group_name(job.name, int(st.get("attempts", 0))))
    attempts = int(st.get("attempts", 0))
    limit = spec_job.spec.backoff_limit
    if attempts - 1 - int(st.get("resumes", 0)) >= limit:  # neither attempt 1 nor a resume's is a retry
        fail(job, "BackoffLimitExceeded" if reason == "PodFailed" else reason,
             f"{message}; backoffLimit {limit} reached after {attempts} attempt(s)")
        return
    st.set(excludedNodes=sorted(set(st.get("excludedNodes", [])) | {n for n in nodes if n != "?"}))
    st.condition("Scheduled", "False", reason, message)
    job.runtime.metrics.replans.labels(reason).inc()
    if not launch(job, spec_job, announce_wait=reason != "Unschedulable") and reason == "Unschedulable":
        fail(job, "Unschedulable", f"{message}; no plan without those nodes")


def watch_pods(job: Job, spec_job: DiffusionJob) -> None:
    """Scheduling/Running: compare the pods with the plan and move the phase."""
    st, settings = job.status, job.runtime.settings
    attempt = int(st.get("attempts", 0))
    found = owned_pods(job)
    job.runtime.book.release(p for p in found if pods.phase(p) in inventory.TERMINATED or pods.terminating(p))
    # Leftovers of an older attempt (an operator that stopped between deleting and re-planning).
    stop(job, [p for p in found if pods.attempt_of(p) < attempt])
    current = {int(p["metadata"]["labels"].get(ch.LABEL_POD_INDEX, -1)): p for p in found
               if pods.attempt_of(p) == attempt and not pods.terminating(p)}
    try:
        slots = ch.pod_slots(Plan.model_validate(st.get("plan")))
    except (ValueError, TypeError):
        slots = []
    attempt_pods = list(current.values())

    broken = [(slot.node, f"pod {ch.pod_name(job.name, attempt, slot.index)} on node {slot.node} is gone")
              for slot in slots if slot.index not in current]
    broken += [(pods.node_of(p), f"pod {p['metadata']['name']} on node {pods.node_of(p)} failed: "
                f"{pods.why_failed(p)}")
               for p in attempt_pods if pods.phase(p) == "Failed"]
    if broken:
        for _, text in broken:
            job.event("PodFailed", text, warning=True)
        retry(job, spec_job, [node for node, _ in broken], "PodFailed", "; ".join(t for _, t in broken),
              attempt_pods)
        return

    phases = [pods.phase(p) for p in attempt_pods]
    if phases and all(p == "Succeeded" for p in phases):
        succeed(job, spec_job)
        return

    timeout = timedelta(seconds=settings.unschedulable_timeout)
    stuck = [p for p in attempt_pods
             if (since := pods.unschedulable_since(p)) is not None and job.now - since >= timeout]
    if stuck:
        names = ", ".join(f"{p['metadata']['name']} (node {pods.node_of(p)})" for p in stuck)
        message = f"worker pod(s) unschedulable for {settings.unschedulable_timeout:g} s: {names}"
        job.event("Unschedulable", message, warning=True)
        retry(job, spec_job, [pods.node_of(p) for p in stuck], "Unschedulable", message, attempt_pods)
        return

    if phases and all(p in ("Running", "Succeeded") for p in phases) and st.phase != "Running":
        created = parse_time((job.body.get("metadata") or {}).get("creationTimestamp"))
        if created is not None:
            job.runtime.metrics.to_running.observe(max(0.0, (job.now - created).total_seconds()))
        st.set(phase="Running")
        st.condition("Scheduled", "True", "Running", f"all {len(phases)} worker pod(s) of attempt {attempt} run")
        job.event("Scheduled", f"attempt {attempt}: all {len(phases)} worker pod(s) running")


def succeed(job: Job, spec_job: DiffusionJob) -> None:
    """Phase Succeeded: outputs, completed progress, conditions, event."""
    st = job.status
    queueing.release(job)
    ratio = measured_over_predicted({"plan": st.get("plan"), "measured": st.get("measured")})
    if ratio is not None:
        job.runtime.metrics.prediction.observe(ratio)
    outputs = list(st.get("outputs", [])) or [spec_job.spec.output.uri.rstrip("/") + "/manifest.json"]
    st.set(phase="Succeeded", completionTime=stamp(job.now), outputs=outputs)
    # Rank 0 reports progress best-effort: if its last patch was lost, completion still shows. Only ever raised
    # to the total (this body may predate the worker's last patch), never reset; measured stays the worker's.
    progress = dict(st.get("progress", {}) or {})
    total = int(progress.get("imagesTotal") or 0)
    if total and int(progress.get("imagesDone") or 0) < total:
        progress.update(imagesDone=total, step=progress.get("steps") or progress.get("step") or 0)
        st.set(progress=progress)
    st.condition("Scheduled", "True", "Completed", "all worker pods completed")
    st.condition("Complete", "True", "Succeeded", f"images written to {spec_job.spec.output.uri}")
    try:
        recorded = learning.record(job, spec_job.spec)
    except ApiException as error:  # the next plans lose a measurement; the job has its images
        job.event("SpeedsNotRecorded", f"measured speeds not written to the GPUNodes: {error.status} "
                  f"{error.reason}", warning=True)
    else:
        if recorded:
            job.logger.info(f"measured speeds of {recorded} GPU(s) written to their GPUNodes")
    job.event("Succeeded", f"attempt {st.get('attempts')}: images written to {spec_job.spec.output.uri}")


def progress_text(job: Job) -> None:
    """The printer columns "3/10 images" from the worker's progress, and the measured speed-up over the plan's
    prediction for one GPU ("1.84x") once rank 0 has reported its median step."""
    st = job.status
    progress = st.get("progress", {}) or {}
    if progress.get("imagesTotal"):
        st.set(progressText=f"{progress.get('imagesDone', 0)}/{progress['imagesTotal']} images")
    plan = st.get("plan") or {}
    single = (plan.get("alternatives") or {}).get("single")
    measured = measured_image_seconds(plan, st.get("measured"))
    if single and measured:
        st.set(speedupText=f"{single / measured:.2f}x")


def deadline_passed(job: Job, spec_job: DiffusionJob) -> bool:
    """Whether activeDeadlineSeconds have passed since the job started."""
    deadline = spec_job.spec.active_deadline_seconds
    start = parse_time(job.status.get("startTime"))
    return deadline is not None and start is not None and job.now - start >= timedelta(seconds=deadline)


def expire(job: Job, ttl: int | None) -> None:
    """ttlSecondsAfterFinished: delete the finished job (its children go with it)."""
    finished = parse_time(job.status.get("completionTime"))
    if ttl is not None and finished is not None and job.now - finished >= timedelta(seconds=ttl):
        job.logger.info(f"deleting: finished {ttl} s ago (ttlSecondsAfterFinished)")
        job.kube.delete("DiffusionJob", job.namespace, job.name)
