"""The thin kopf handlers of DiffusionJob (admit, plan, respec, the reconcile timer), startup, and
:func:`register`, which wires them into a registry with the operator's settings.

All handlers are plain synchronous functions (kopf runs them in threads) that take what they need from kopf's
kwargs; the lifecycle they implement is described in :mod:`stadi_operator.controller`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import kopf
from prometheus_client import start_http_server

from stadi.api import GROUP, VERSION
from stadi_operator.controller.admission import reject, validate
from stadi_operator.controller.indexes import (
    stadi_gpu_claims,
    stadi_gpu_pods,
    stadi_gpu_slices,
    stadi_nodes,
    stadi_telemetry,
)
from stadi_operator.controller.launch import admit_queued, launch
from stadi_operator.controller.lifecycle import (
    deadline_passed,
    expire,
    fail,
    owned_pods,
    progress_text,
    requeue_if_evicted,
    resume,
    stop,
    suspend,
    watch_pods,
)
from stadi_operator.controller.runtime import Job, Runtime, runtime_of
from stadi_operator.controller.status import parse_time, stamp
from stadi_operator.kube import Kube
from stadi_operator.settings import OperatorSettings

JOBS = (GROUP, VERSION, "diffusionjobs")
FINAL = ("Succeeded", "Failed")


def admit(patch: kopf.Patch, **kwargs: Any) -> None:
    """Create/resume, step 1: validate the spec; Planning, or Failed with the validation message."""
    job = Job.of(kwargs)
    if job.status.phase != "Pending":
        return  # resumed: admitted long ago
    spec_job, message = validate(job.body)
    if spec_job is None:
        reject(job, message)
    else:
        job.status.set(phase="Planning", observedGeneration=job.status.generation, startTime=stamp(job.now))
        job.status.condition("Valid", "True", "Valid", "spec is valid")
        if spec_job.spec.suspend:
            suspend(job, [])
    _apply(job, patch)


def plan(patch: kopf.Patch, **kwargs: Any) -> None:
    """Create/resume, step 2: plan and create the first attempt's pod group (or re-create a crashed one)."""
    job = Job.of(kwargs)
    planned = job.status.condition_of("Planned")
    if job.status.phase != "Planning" or (planned is not None and planned.get("status") == "False"):
        return  # not admitted, already launched, or waiting for GPUs (the timer's business)
    spec_job, message = validate(job.body)
    if spec_job is None:
        reject(job, message)
    else:
        launch(job, spec_job)
    _apply(job, patch)


def respec(patch: kopf.Patch, **kwargs: Any) -> None:
    """Update of the spec: suspend or resume (spec.suspend), else re-plan unless a gang is running (or the job
    succeeded)."""
    job = Job.of(kwargs)
    st = job.status
    if st.phase not in FINAL and _suspension(job):
        _apply(job, patch)
        return
    if st.phase in ("Scheduling", "Running", "Succeeded"):
        job.event("SpecChangeIgnored", f"spec changed while {st.phase}: the job keeps running generation "
                  f"{st.get('observedGeneration')}; edit it again once it has failed to re-plan", warning=True)
        return
    spec_job, message = validate(job.body)
    if spec_job is None:
        reject(job, message)
    else:
        stop(job, owned_pods(job))
        st.set(phase="Planning", completionTime=None, excludedNodes=[], startTime=stamp(job.now))
        st.condition("Valid", "True", "Valid", "spec is valid")
        st.condition("Failed", "False", "SpecChanged", "the spec changed; planning again")
        if spec_job.spec.suspend:
            suspend(job, [])
        else:
            if int(st.get("attempts", 0)):
                job.runtime.metrics.replans.labels("SpecChanged").inc()
            launch(job, spec_job)
    _apply(job, patch)


def _apply(job: Job, patch: kopf.Patch) -> None:
    """Write the run's status changes into kopf's patch; the phase metric follows."""
    job.status.apply(patch)
    job.runtime.metrics.phase(job.namespace, job.name, job.status.phase)


def forget(memo: kopf.Memo, namespace: str, name: str, **_: Any) -> None:
    """Deletion of a job: it leaves the phase metric (no finalizer: nothing else to clean up)."""
    runtime_of(memo).metrics.phase(namespace, name, None)


def _suspension(job: Job) -> bool:
    """Act on spec.suspend where the phase disagrees with it (a valid spec only); True if it did."""
    spec_job, _ = validate(job.body)
    if spec_job is None:
        return False
    suspended = job.status.phase == "Suspended"
    if spec_job.spec.suspend and not suspended:
        suspend(job, owned_pods(job))
    elif suspended and not spec_job.spec.suspend:
        resume(job, spec_job)
    else:
        return suspended  # still suspended: any other change waits for the resume, which plans the spec as it is
    return True


def reconcile(patch: kopf.Patch, **kwargs: Any) -> None:
    """Timer: deadline, re-planning while waiting for GPUs, the pods of the current attempt, TTL."""
    job = Job.of(kwargs)
    st = job.status
    if st.phase == "Pending":
        return  # admit's business
    spec_job, _ = validate(job.body)
    if st.phase in FINAL:
        ttl = spec_job.spec.ttl_seconds_after_finished if spec_job else None
        expire(job, ttl)
        return
    if spec_job is None:
        return  # the create/update handlers report invalid specs
    if _suspension(job):  # also where an update event was missed
        _apply(job, patch)
        return
    if deadline_passed(job, spec_job):
        fail(job, "DeadlineExceeded",
             f"activeDeadlineSeconds ({spec_job.spec.active_deadline_seconds}) exceeded in phase {st.phase}",
             owned_pods(job))
    elif st.phase == "Planning":
        planned = st.condition_of("Planned")
        if planned is not None and planned.get("status") == "False":
            since = parse_time(planned.get("lastTransitionTime")) or job.now
            if job.now - since >= timedelta(seconds=job.runtime.settings.unschedulable_timeout):
                fail(job, "Unschedulable", f"no GPUs for this job for "
                     f"{job.runtime.settings.unschedulable_timeout:g} s: {planned.get('message', '')}")
            else:
                launch(job, spec_job)
    elif not requeue_if_evicted(job, spec_job):
        if st.phase == "Queued":
            admit_queued(job, spec_job)
        else:
            watch_pods(job, spec_job)
    progress_text(job)
    _apply(job, patch)


# --- startup and registration -----------------------------------------------------------------------------


def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Configure kopf from our settings; build the API adapter and detect Volcano once."""
    options = memo.get("options") or OperatorSettings()
    options.configure_kopf(settings)
    if not isinstance(memo.get("runtime"), Runtime):
        kube = Kube.from_environment(options.request_timeout)
        volcano = options.volcano == "on" or (
            options.volcano == "auto" and kube.has_resource("scheduling.volcano.sh/v1beta1", "podgroups"))
        kueue = kube.has_resource("kueue.x-k8s.io/v1beta2", "workloads")
        memo.runtime = Runtime(options, kube, volcano, kueue)
        if options.metrics_port is not None:
            start_http_server(options.metrics_port, registry=memo.runtime.metrics.registry)
    logger.info(f"stadi operator ready: volcano={memo.runtime.volcano} kueue={memo.runtime.kueue}")


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings,
             login: Callable[..., Any] = kopf.login_via_client) -> kopf.OperatorRegistry:
    """Wire the handlers into a registry (no import-time registration: the timer interval is a setting).

    A registry of our own has no login handler, so one is always added: by default the kubernetes client's
    (in-cluster service account, else the kubeconfig).
    """
    backoff = settings.retry_backoff
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(startup)
    kopf.index("nodes", registry=registry)(stadi_nodes)
    kopf.index("pods", registry=registry)(stadi_gpu_pods)
    kopf.index(GROUP, VERSION, "gpunodes", registry=registry)(stadi_telemetry)
    kopf.index("resource.k8s.io", "v1", "resourceslices", registry=registry)(stadi_gpu_slices)
    kopf.index("resource.k8s.io", "v1", "resourceclaims", registry=registry)(stadi_gpu_claims)
    for on in (kopf.on.create, kopf.on.resume):
        on(*JOBS, id="admit", backoff=backoff, registry=registry)(admit)
        on(*JOBS, id="plan", backoff=backoff, registry=registry)(plan)
    kopf.on.update(*JOBS, id="respec", field="spec", backoff=backoff, registry=registry)(respec)
    kopf.on.delete(*JOBS, id="forget", optional=True, registry=registry)(forget)
    kopf.timer(*JOBS, id="reconcile", interval=settings.reconcile_interval, initial_delay=1.0,
               backoff=backoff, registry=registry)(reconcile)
    return registry
