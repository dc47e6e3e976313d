"""Starting an attempt: plan it (or adopt the plan a crashed predecessor committed to), wait for Kueue to admit
it when the job is queued, and create its children."""

from __future__ import annotations

from stadi.api import DiffusionJob, DiffusionJobStatus, Plan
from stadi.planner import plan_job
from stadi_operator.controller import children as ch
from stadi_operator.controller import learning, queueing
from stadi_operator.controller.admission import refusal, reject
from stadi_operator.controller.adoption import committed_plan, ensure, sync
from stadi_operator.controller.runtime import Job
from stadi_operator.controller.status import stamp


def launch(job: Job, spec_job: DiffusionJob, *, announce_wait: bool = True) -> bool:
    """Start attempt ``attempts + 1``: plan (or adopt the committed plan), then phase Queued until Kueue admits
    it (a queued job) or at once Scheduling with its children created. The previous attempt's Workload is
    released. Without a plan (no usable GPUs), phase Planning with ``Planned=False`` and False is returned; the
    timer tries again and gives up after the unschedulable timeout. A job the cluster refuses (``refusal``) is
    Failed at once, before any plan or child."""
    with job.runtime.book.lock:
        queueing.release(job)
        if refused := refusal(job, spec_job):
            reject(job, refused[1], refused[0])
            return True
        return _launch(job, spec_job, announce_wait)


def admit_queued(job: Job, spec_job: DiffusionJob) -> None:
    """Phase Queued: start the planned attempt once Kueue has admitted its Workload."""
    with job.runtime.book.lock:
        plan = Plan.model_validate(job.status.get("plan"))
        _begin(job, spec_job, plan, int(job.status.get("attempts", 0)), adopted=True)


def _launch(job: Job, spec_job: DiffusionJob, announce_wait: bool) -> bool:
    st, owner, kube, settings = job.status, job.owner, job.kube, job.runtime.settings
    attempt = int(st.get("attempts", 0)) + 1
    committed = kube.get("ConfigMap", owner.namespace, ch.plan_name(owner.name))
    plan = committed_plan(committed, owner, attempt)
    adopted = plan is not None
    excluded = list(st.get("excludedNodes", []))
    if plan is None:
        pool = job.indexes.devices(spec_job, excluded, job.now, settings.telemetry_stale_after,
                                   pods=job.runtime.book.with_promises(job.indexes.pods))
        learned = learning.learned_speeds(job.indexes.telemetry, spec_job.spec, job.now, settings.learned_half_life)
        try:
            with job.runtime.metrics.planning.time():
                plan = plan_job(spec_job.spec, learning.with_learned(pool, learned))
        except ValueError as error:
            message = f"no plan for attempt {attempt}: {error}" + (
                f" (excluded nodes: {', '.join(excluded)})" if excluded else "")
            st.set(phase="Planning", observedGeneration=st.generation)
            if st.condition("Planned", "False", "NoCapacity", message) and announce_wait:
                job.event("Unschedulable", message, warning=True)
            return False
        if used := learning.used(plan, learned):
            job.event("LearnedSpeeds", f"attempt {attempt} planned with speeds measured by earlier jobs: {used}")
    _begin(job, spec_job, plan, attempt, adopted)
    return True


def _begin(job: Job, spec_job: DiffusionJob, plan: Plan, attempt: int, adopted: bool) -> None:
    """Record the attempt's plan; create its children unless it waits in a Kueue queue."""
    st, owner = job.status, job.owner
    slots = ch.pod_slots(plan)
    desired = ch.children(owner, spec_job.spec, plan, attempt, job.runtime.worker_options, job.indexes.dra_nodes)
    nodes = ", ".join(f"{s.node}×{s.gpus}" for s in slots)
    message = (f"attempt {attempt}: {plan.strategy} on {plan.world_size} GPU(s) in {len(slots)} pod(s) "
               f"[{nodes}], predicted {plan.predicted_seconds:.1f} s")
    recorded = dict(attempts=attempt, plan=DiffusionJobStatus(plan=plan).dump()["plan"], gpus=len(plan.active),
                    strategy=plan.strategy, observedGeneration=st.generation,
                    predictedText=f"{plan.predicted_seconds:.2f}s", nodesText=nodes)
    st.condition("Planned", "True", "Replanned" if attempt > 1 else "Planned", message)
    if (queue := queueing.queue_of(job.body)) is not None:
        try:
            workload = queueing.ensure_workload(job, queue, attempt, [d for d in desired if d["kind"] == "Pod"])
        except queueing.QueueError as error:
            st.set(phase="Failed", completionTime=stamp(job.now))
            st.condition("Failed", "True", "QueueUnavailable", str(error))
            job.event("QueueUnavailable", str(error), warning=True)
            job.runtime.metrics.failures.labels("QueueUnavailable").inc()
            return
        if not queueing.admitted(workload):
            st.set(phase="Queued", **recorded)
            waiting = f"waiting for Kueue to admit Workload {ch.workload_name(owner.name, attempt)} (queue {queue})"
            st.condition("Admitted", "False", "Queued", waiting)
            if not adopted:  # once per attempt (a later call finds it still waiting)
                job.event("Queued", f"{message}; {waiting}")
            return
        if st.condition("Admitted", "True", "Admitted", f"Kueue admitted Workload "
                        f"{ch.workload_name(owner.name, attempt)} (queue {queue})"):
            job.event("Admitted", f"attempt {attempt}: admitted by Kueue (queue {queue})")
    made: dict[str, int] = {}
    for child in desired:
        current, what = ensure(job.kube, child, owner)
        made[what] = made.get(what, 0) + 1
        if child["kind"] == "Pod":
            job.runtime.book.promise(child)
        if what != "created":
            sync(job.kube, current, child)
    job.logger.info(f"attempt {attempt} children: {made}")
    st.set(phase="Scheduling", **recorded)
    st.condition("Scheduled", "False", "PodsCreated", f"waiting for {len(slots)} worker pod(s) to run")
    if not adopted:
        job.event("Replanned" if attempt > 1 else "Planned", message)
