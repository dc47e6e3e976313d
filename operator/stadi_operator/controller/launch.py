"""Starting an attempt: plan it (or adopt the plan a crashed predecessor committed to) and create its children."""

from __future__ import annotations

from stadi.api import DiffusionJob, DiffusionJobStatus
from stadi.planner import plan_job
from stadi_operator.controller import children as ch
from stadi_operator.controller.adoption import committed_plan, ensure, sync
from stadi_operator.controller.runtime import Job


def launch(job: Job, spec_job: DiffusionJob, *, announce_wait: bool = True) -> bool:
    """Start attempt ``attempts + 1``: plan (or adopt the committed plan), create the children, phase Scheduling.
    Without a plan (no usable GPUs), phase Planning with ``Planned=False`` and False is returned; the timer
    tries again and gives up after the unschedulable timeout."""
    with job.runtime.book.lock:
        return _launch(job, spec_job, announce_wait)


def _launch(job: Job, spec_job: DiffusionJob, announce_wait: bool) -> bool:
    st, owner, kube, settings = job.status, job.owner, job.kube, job.runtime.settings
    book = job.runtime.book
    attempt = int(st.get("attempts", 0)) + 1
    committed = kube.get("ConfigMap", owner.namespace, ch.plan_name(owner.name))
    plan = committed_plan(committed, owner, attempt)
    adopted = plan is not None
    excluded = list(st.get("excludedNodes", []))
    if plan is None:
        pool = job.indexes.devices(spec_job, excluded, job.now, settings.telemetry_stale_after,
                                   pods=book.with_promises(job.indexes.pods))
        try:
            plan = plan_job(spec_job.spec, pool)
        except ValueError as error:
            message = f"no plan for attempt {attempt}: {error}" + (
                f" (excluded nodes: {', '.join(excluded)})" if excluded else "")
            st.set(phase="Planning", observedGeneration=st.generation)
            if st.condition("Planned", "False", "NoCapacity", message) and announce_wait:
                job.event("Unschedulable", message, warning=True)
            return False
    slots = ch.pod_slots(plan)
    made: dict[str, int] = {}
    for desired in ch.children(owner, spec_job.spec, plan, attempt, job.runtime.worker_options,
                               job.indexes.dra_nodes):
        current, what = ensure(kube, desired, owner)
        made[what] = made.get(what, 0) + 1
        if desired["kind"] == "Pod":
            book.promise(desired)
        if what != "created":
            sync(kube, current, desired)
    job.logger.info(f"attempt {attempt} children: {made}")
    st.set(phase="Scheduling", attempts=attempt, plan=DiffusionJobStatus(plan=plan).dump()["plan"],
           gpus=len(plan.active), strategy=plan.strategy, observedGeneration=st.generation)
    nodes = ", ".join(f"{s.node}×{s.gpus}" for s in slots)
    message = (f"attempt {attempt}: {plan.strategy} on {plan.world_size} GPU(s) in {len(slots)} pod(s) "
               f"[{nodes}], predicted {plan.predicted_seconds:.1f} s")
    st.condition("Planned", "True", "Replanned" if attempt > 1 else "Planned", message)
    st.condition("Scheduled", "False", "PodsCreated", f"waiting for {len(slots)} worker pod(s) to run")
    if not adopted:
        job.event("Replanned" if attempt > 1 else "Planned", message)
    return True
