"""kopf handlers of DiffusionJob: validate, plan, create the pod group, watch it, recover, finish.

Lifecycle (``status.phase``)::

    Pending --admit--> Planning --plan--> Scheduling --pods bound and running--> Running --all done--> Succeeded
       |                  ^   |                 |                                   |
       +--> Failed        |   +--(no GPUs: waits, then Failed/Unschedulable)        |
          (InvalidSpec)   +------- a pod failed / gang unschedulable: re-plan -------+--> Failed (backoff,
                                   without those nodes, attempt + 1                        deadline, ...)

* ``admit`` and ``plan`` are two create/resume handlers: kopf runs one per cycle and applies its status patch
  before the next, so Planning is visible while the planner runs.
* ``reconcile`` is a timer: it lists the job's pods and moves the phase; it is level-triggered, so an operator
  restarted at any point picks up where the last one stopped.
* Children are created idempotently: looked up first, a 409 means another run got there first and the object is
  adopted. The ConfigMap ``<job>-plan`` records the attempt number with its plan; a restarted operator that finds
  the ConfigMap of the attempt it is about to start reuses that plan instead of planning again, so the pods it
  creates (deterministic names) are exactly the ones a crashed predecessor may already have created.
* Spec updates while Pending/Planning/Failed re-validate and re-plan. While Scheduling/Running/Succeeded they are
  ignored with a ``SpecChangeIgnored`` event: the gang runs the spec it started with (its job.json), and
  ``status.observedGeneration`` stays behind ``metadata.generation`` to show it.
* Retries (``spec.backoffLimit``) are counted over the job's life by ``status.attempts`` (attempt numbers name
  the pods, so they never restart). Editing the spec of a Failed job starts one new attempt; retrying after that
  one fails needs a ``backoffLimit`` above the attempts made.
* Pod changes are seen by the timer, every ``reconcileInterval`` seconds (default 5): one writer of the status,
  level-triggered, at the cost of up to one interval of latency per transition.
* Terminated pods of failed attempts are kept (their logs explain the failure); the garbage collector removes
  them with the job.

All handlers are plain synchronous functions (kopf runs them in threads) that take what they need from kopf's
kwargs; :func:`register` wires them into a registry with the operator's settings.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from stadi.api import API_VERSION, GROUP, VERSION, Condition, DiffusionJob, DiffusionJobStatus, Plan, load_job
from stadi.families import not_runnable
from stadi.planner import Device, plan_job
from stadi_operator import children as ch
from stadi_operator import inventory
from stadi_operator.kube import Kube
from stadi_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

JOBS = (GROUP, VERSION, "diffusionjobs")
FINAL = ("Succeeded", "Failed")
# Worker pod names are `<job>-a<attempt>-<index>` and double as DNS labels (<= 63 characters).
MAX_JOB_NAME = 52


@dataclass
class GpuBook:
    """GPUs promised to worker pods this operator has just created, until the pod index shows them.

    kopf runs the handlers of many jobs at once, and a pod reaches the index only after its watch event: jobs
    planned in that gap would all pick the same free GPUs. Launches take the lock, plan against the index plus
    these promises, and add their pods' promises; a promise lapses when the index shows its pod or after ttl.
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


@dataclass
class Runtime:
    """What every handler needs besides the object: settings, the API adapter, detected features, a clock.
    Built once at startup and kept in kopf's memo."""

    settings: OperatorSettings
    kube: Kube
    volcano: bool = False
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    book: GpuBook = field(default_factory=lambda: GpuBook())

    @property
    def worker_options(self) -> ch.WorkerOptions:
        s = self.settings
        return ch.WorkerOptions(image=s.worker_image, port=s.rendezvous_port, volcano=self.volcano,
                                run_as_user=s.worker_uid, progress_interval=s.progress_interval)


def _runtime(memo: Any) -> Runtime:
    runtime = getattr(memo, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise kopf.PermanentError("operator not started: memo.runtime is missing")
    return runtime


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_time(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class StatusUpdate:
    """The status changes of one handler run, written into kopf's patch at the end (one PATCH per run)."""

    def __init__(self, status: Mapping[str, Any] | None, generation: int | None, now: datetime) -> None:
        self.original = copy.deepcopy(dict(status or {}))
        self.generation = generation
        self.now = now
        self.changes: dict[str, Any] = {}
        self.conditions = [dict(c) for c in self.original.get("conditions") or []]
        self._conditions_changed = False

    def get(self, key: str, default: Any = None) -> Any:
        value = self.changes[key] if key in self.changes else self.original.get(key)
        return default if value is None else value

    @property
    def phase(self) -> str:
        return str(self.get("phase", "Pending"))

    def set(self, **fields: Any) -> None:
        """Set status fields by their wire (camelCase) names; None removes a field."""
        for key, value in fields.items():
            if self.original.get(key) != value or key in self.changes:
                self.changes[key] = value

    def condition_of(self, kind: str) -> dict[str, Any] | None:
        return next((c for c in self.conditions if c.get("type") == kind), None)

    def condition(self, kind: str, status: str, reason: str, message: str = "") -> bool:
        """Set a condition; lastTransitionTime moves only when its status changes. True if the status changed."""
        old = self.condition_of(kind)
        changed = old is None or old.get("status") != status
        new = Condition(
            type=kind, status=status, reason=reason, message=message, observed_generation=self.generation,
            last_transition_time=self.now if changed else _parse_time(old.get("lastTransitionTime")) or self.now,
        ).dump()
        if old != new:
            self.conditions = [c for c in self.conditions if c.get("type") != kind] + [new]
            self._conditions_changed = True
        return changed

    def apply(self, patch: kopf.Patch) -> None:
        for key, value in self.changes.items():
            patch.status[key] = value
        if self._conditions_changed:
            patch.status["conditions"] = self.conditions


@dataclass(frozen=True)
class Indexes:
    """kopf's inventory indexes (or plain dicts of lists in tests)."""

    nodes: Mapping[str, Iterable[inventory.NodeInfo]]
    pods: Mapping[str, Iterable[inventory.PodUsage]]
    telemetry: Mapping[str, Iterable[inventory.Telemetry]]

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Indexes:
        return cls(kwargs.get("stadi_nodes") or {}, kwargs.get("stadi_gpu_pods") or {},
                   kwargs.get("stadi_telemetry") or {})

    def devices(self, job: DiffusionJob, exclude: Iterable[str], now: datetime, stale_after: float,
                pods: Mapping[str, Iterable[inventory.PodUsage]] | None = None) -> list[Device]:
        template = job.spec.template
        telemetry = {node: t for node, store in self.telemetry.items() for t in store}
        return inventory.free_devices(
            [n for store in self.nodes.values() for n in store], self.pods if pods is None else pods, telemetry,
            resource=template.gpu_resource, tolerations=template.tolerations, node_selector=template.node_selector,
            exclude=exclude, now=now, stale_after=stale_after,
            # This job's own pods are leaving (a failed attempt being replaced): their GPUs are about to be free.
            ignore_job=(job.metadata.namespace or "", job.metadata.name or ""),
        )


@dataclass
class Job:
    """One handler run's view of a DiffusionJob."""

    runtime: Runtime
    body: Mapping[str, Any]
    status: StatusUpdate
    logger: logging.Logger | logging.LoggerAdapter[Any]
    indexes: Indexes

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def owner(self) -> ch.Owner:
        return ch.Owner(self.name, self.namespace, str(self.body["metadata"].get("uid", "")))

    @property
    def kube(self) -> Kube:
        return self.runtime.kube

    @property
    def now(self) -> datetime:
        return self.status.now

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        (self.logger.warning if warning else self.logger.info)(f"{reason}: {message}")
        self.kube.event(dict(self.body), reason, message, warning=warning, now=self.now)


def _job(kwargs: Mapping[str, Any]) -> Job:
    runtime = _runtime(kwargs["memo"])
    body = kwargs["body"]
    status = StatusUpdate(body.get("status"), body.get("metadata", {}).get("generation"), runtime.clock())
    return Job(runtime, body, status, kwargs.get("logger") or log, Indexes.of(kwargs))


# --- validation -------------------------------------------------------------------------------------------


def validate(body: Mapping[str, Any]) -> tuple[DiffusionJob | None, str]:
    """The job parsed by the pydantic model, or None and one line naming every bad field."""
    meta = body.get("metadata") or {}
    name = str(meta.get("name") or "")
    if len(name) > MAX_JOB_NAME or not name[:1].isalpha():
        return None, (f"metadata.name: must start with a letter and have at most {MAX_JOB_NAME} characters "
                      "(it names the job's Service and worker pod hostnames)")
    document = {"apiVersion": API_VERSION, "kind": "DiffusionJob",
                "metadata": {"name": name, "namespace": meta.get("namespace")},
                "spec": copy.deepcopy(dict(body.get("spec") or {}))}
    try:
        job = load_job(document)
    except ValueError as error:
        return None, str(error).removeprefix("invalid DiffusionJob: ")
    why = not_runnable(job.spec.model.family)
    return (None, why) if why else (job, "")


def _reject(job: Job, message: str) -> None:
    """An invalid spec is final until the spec changes: no retry loop, one event."""
    st = job.status
    st.set(phase="Failed", observedGeneration=st.generation, completionTime=_stamp(job.now))
    st.condition("Valid", "False", "InvalidSpec", message)
    if st.condition("Failed", "True", "InvalidSpec", message):
        job.event("InvalidSpec", message, warning=True)


# --- children ---------------------------------------------------------------------------------------------


class ChildConflict(kopf.TemporaryError):
    """A child's name is taken by an object another controller owns."""


def _controlled_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def ensure(kube: Kube, desired: dict[str, Any], owner: ch.Owner) -> tuple[dict[str, Any], str]:
    """Create a child unless it exists; adopt an existing one without a controller. Returns (object, what
    happened: "created", "adopted" or "exists")."""
    kind, meta = desired["kind"], desired["metadata"]
    current = kube.get(kind, meta["namespace"], meta["name"])
    if current is None:
        try:
            return kube.create(desired), "created"
        except ApiException as error:
            if error.status != 409:
                raise
            current = kube.get(kind, meta["namespace"], meta["name"])
            if current is None:  # created and deleted in between: try again later
                raise kopf.TemporaryError(f"{kind} {meta['name']} is being replaced", delay=2) from None
    if _controlled_by(current, owner.uid):
        return current, "exists"
    refs = list((current.get("metadata") or {}).get("ownerReferences") or [])
    if any(ref.get("controller") for ref in refs):
        raise ChildConflict(f"{kind} {meta['name']} exists and belongs to another controller", delay=30)
    adopted = kube.patch(kind, meta["namespace"], meta["name"],
                         {"metadata": {"ownerReferences": [*refs, owner.reference()]}})
    return adopted, "adopted"


def _adopted_plan(config_map: Mapping[str, Any] | None, owner: ch.Owner, attempt: int) -> Plan | None:
    """The plan a previous run already committed to for this attempt, if any (an owner-less ConfigMap is
    about to be adopted; one controlled by another object is not ours to trust)."""
    refs = ((config_map or {}).get("metadata") or {}).get("ownerReferences") or []
    if not config_map or any(r.get("controller") and r.get("uid") != owner.uid for r in refs):
        return None
    annotations = (config_map.get("metadata") or {}).get("annotations") or {}
    if annotations.get(ch.ANNOTATION_ATTEMPT) != str(attempt):
        return None
    try:
        return Plan.model_validate_json((config_map.get("data") or {}).get("plan.json", ""))
    except ValueError:
        return None


def _sync(kube: Kube, current: Mapping[str, Any], desired: Mapping[str, Any], kind: str) -> None:
    """Bring the per-attempt parts of long-lived children up to date (plan data, Service selector)."""
    meta = desired["metadata"]
    if kind == "ConfigMap":
        want = meta["annotations"][ch.ANNOTATION_ATTEMPT]
        have = ((current.get("metadata") or {}).get("annotations") or {}).get(ch.ANNOTATION_ATTEMPT)
        if have != want or current.get("data") != desired["data"]:
            kube.patch(kind, meta["namespace"], meta["name"],
                       {"metadata": {"annotations": {ch.ANNOTATION_ATTEMPT: want}}, "data": desired["data"]})
    elif kind == "Service":
        selector = desired["spec"]["selector"]
        if (current.get("spec") or {}).get("selector") != selector:
            kube.patch(kind, meta["namespace"], meta["name"], {"spec": {"selector": selector}})


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
    plan = _adopted_plan(committed, owner, attempt)
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
    for desired in ch.children(owner, spec_job.spec, plan, attempt, job.runtime.worker_options):
        current, what = ensure(kube, desired, owner)
        made[what] = made.get(what, 0) + 1
        if desired["kind"] == "Pod":
            book.promise(desired)
        if what != "created":
            _sync(kube, current, desired, desired["kind"])
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


# --- pods -------------------------------------------------------------------------------------------------


def _pod_phase(pod: Mapping[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def _terminating(pod: Mapping[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def _attempt_of(pod: Mapping[str, Any]) -> int:
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(ch.LABEL_ATTEMPT, -1))
    except ValueError:
        return -1


def _node_of(pod: Mapping[str, Any]) -> str:
    return str((pod.get("spec") or {}).get("nodeName")
               or ((pod.get("metadata") or {}).get("annotations") or {}).get(ch.ANNOTATION_NODE, "?"))


def unschedulable_since(pod: Mapping[str, Any]) -> datetime | None:
    """When the scheduler last found no room for a pending pod, if it did."""
    if _pod_phase(pod) != "Pending":
        return None
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return _parse_time(c.get("lastTransitionTime"))
    return None


def _why(pod: Mapping[str, Any]) -> str:
    """The clearest reason a pod failed: the container's termination, else the pod's."""
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            text = f"{term.get('reason') or 'Error'} (exit code {term.get('exitCode')})"
            return f"{text}: {term['message']}" if term.get("message") else text
    return ": ".join(x for x in (status.get("reason"), status.get("message")) if x) or "failed"


def _stop(job: Job, pods: Iterable[Mapping[str, Any]]) -> int:
    """Delete the pods that still run (terminated ones stay for their logs). Returns how many."""
    stopped = 0
    for pod in pods:
        if _pod_phase(pod) not in inventory.TERMINATED and not _terminating(pod):
            stopped += job.kube.delete("Pod", job.namespace, pod["metadata"]["name"])
    return stopped


def _fail(job: Job, reason: str, message: str, pods: Iterable[Mapping[str, Any]] = ()) -> None:
    st = job.status
    _stop(job, pods)
    st.set(phase="Failed", completionTime=_stamp(job.now))
    st.condition("Failed", "True", reason, message)
    job.event(reason, message, warning=True)


def _retry(job: Job, spec_job: DiffusionJob, nodes: Iterable[str], reason: str, message: str,
           pods: list[dict[str, Any]]) -> None:
    """Replace the current attempt: stop its pods, exclude the nodes at fault, plan again (or fail)."""
    st = job.status
    _stop(job, pods)
    if job.runtime.volcano:
        job.kube.delete("PodGroup", job.namespace, ch.pod_group_name(job.name, int(st.get("attempts", 0))))
    attempts = int(st.get("attempts", 0))
    limit = spec_job.spec.backoff_limit
    if attempts - 1 >= limit:  # attempt 1 is not a retry
        _fail(job, "BackoffLimitExceeded" if reason == "PodFailed" else reason,
              f"{message}; backoffLimit {limit} reached after {attempts} attempt(s)")
        return
    st.set(excludedNodes=sorted(set(st.get("excludedNodes", [])) | {n for n in nodes if n != "?"}))
    st.condition("Scheduled", "False", reason, message)
    if not launch(job, spec_job, announce_wait=reason != "Unschedulable") and reason == "Unschedulable":
        _fail(job, "Unschedulable", f"{message}; no plan without those nodes")


def watch_pods(job: Job, spec_job: DiffusionJob) -> None:
    """Scheduling/Running: compare the pods with the plan and move the phase."""
    st, settings = job.status, job.runtime.settings
    attempt = int(st.get("attempts", 0))
    pods = [p for p in job.kube.list("Pod", job.namespace, {ch.LABEL_JOB: job.name})
            if _controlled_by(p, job.owner.uid)]
    # Leftovers of an older attempt (an operator that stopped between deleting and re-planning).
    _stop(job, [p for p in pods if _attempt_of(p) < attempt])
    current = {int(p["metadata"]["labels"].get(ch.LABEL_POD_INDEX, -1)): p for p in pods
               if _attempt_of(p) == attempt and not _terminating(p)}
    try:
        slots = ch.pod_slots(Plan.model_validate(st.get("plan")))
    except (ValueError, TypeError):
        slots = []
    attempt_pods = list(current.values())

    broken = [(slot.node, f"pod {ch.pod_name(job.name, attempt, slot.index)} on node {slot.node} is gone")
              for slot in slots if slot.index not in current]
    broken += [(_node_of(p), f"pod {p['metadata']['name']} on node {_node_of(p)} failed: {_why(p)}")
               for p in attempt_pods if _pod_phase(p) == "Failed"]
    if broken:
        for _, text in broken:
            job.event("PodFailed", text, warning=True)
        _retry(job, spec_job, [node for node, _ in broken], "PodFailed", "; ".join(t for _, t in broken),
               attempt_pods)
        return

    phases = [_pod_phase(p) for p in attempt_pods]
    if phases and all(p == "Succeeded" for p in phases):
        _succeed(job, spec_job)
        return

    timeout = timedelta(seconds=settings.unschedulable_timeout)
    stuck = [p for p in attempt_pods if (since := unschedulable_since(p)) is not None and job.now - since >= timeout]
    if stuck:
        names = ", ".join(f"{p['metadata']['name']} (node {_node_of(p)})" for p in stuck)
        message = f"worker pod(s) unschedulable for {settings.unschedulable_timeout:g} s: {names}"
        job.event("Unschedulable", message, warning=True)
        _retry(job, spec_job, [_node_of(p) for p in stuck], "Unschedulable", message, attempt_pods)
        return

    if phases and all(p in ("Running", "Succeeded") for p in phases) and st.phase != "Running":
        st.set(phase="Running")
        st.condition("Scheduled", "True", "Running", f"all {len(phases)} worker pod(s) of attempt {attempt} run")
        job.event("Scheduled", f"attempt {attempt}: all {len(phases)} worker pod(s) running")


def _succeed(job: Job, spec_job: DiffusionJob) -> None:
    st = job.status
    outputs = list(st.get("outputs", [])) or [spec_job.spec.output.uri.rstrip("/") + "/manifest.json"]
    st.set(phase="Succeeded", completionTime=_stamp(job.now), outputs=outputs)
    # Rank 0 reports progress best-effort: if its last patch was lost, completion still shows. Only ever raised
    # to the total (this body may predate the worker's last patch), never reset; measured stays the worker's.
    progress = dict(st.get("progress", {}) or {})
    total = int(progress.get("imagesTotal") or 0)
    if total and int(progress.get("imagesDone") or 0) < total:
        progress.update(imagesDone=total, step=progress.get("steps") or progress.get("step") or 0)
        st.set(progress=progress)
    st.condition("Scheduled", "True", "Completed", "all worker pods completed")
    st.condition("Complete", "True", "Succeeded", f"images written to {spec_job.spec.output.uri}")
    job.event("Succeeded", f"attempt {st.get('attempts')}: images written to {spec_job.spec.output.uri}")


def _progress_text(job: Job) -> None:
    progress = job.status.get("progress", {}) or {}
    if progress.get("imagesTotal"):
        job.status.set(progressText=f"{progress.get('imagesDone', 0)}/{progress['imagesTotal']} images")


def _deadline_passed(job: Job, spec_job: DiffusionJob) -> bool:
    deadline = spec_job.spec.active_deadline_seconds
    start = _parse_time(job.status.get("startTime"))
    return deadline is not None and start is not None and job.now - start >= timedelta(seconds=deadline)


def _expire(job: Job, ttl: int | None) -> None:
    """ttlSecondsAfterFinished: delete the finished job (its children go with it)."""
    finished = _parse_time(job.status.get("completionTime"))
    if ttl is not None and finished is not None and job.now - finished >= timedelta(seconds=ttl):
        job.logger.info(f"deleting: finished {ttl} s ago (ttlSecondsAfterFinished)")
        job.kube.delete("DiffusionJob", job.namespace, job.name)


# --- handlers ---------------------------------------------------------------------------------------------


def admit(patch: kopf.Patch, **kwargs: Any) -> None:
    """Create/resume, step 1: validate the spec; Planning, or Failed with the validation message."""
    job = _job(kwargs)
    if job.status.phase != "Pending":
        return  # resumed: admitted long ago
    spec_job, message = validate(job.body)
    if spec_job is None:
        _reject(job, message)
    else:
        job.status.set(phase="Planning", observedGeneration=job.status.generation, startTime=_stamp(job.now))
        job.status.condition("Valid", "True", "Valid", "spec is valid")
    job.status.apply(patch)


def plan(patch: kopf.Patch, **kwargs: Any) -> None:
    """Create/resume, step 2: plan and create the first attempt's pod group (or re-create a crashed one)."""
    job = _job(kwargs)
    planned = job.status.condition_of("Planned")
    if job.status.phase != "Planning" or (planned is not None and planned.get("status") == "False"):
        return  # not admitted, already launched, or waiting for GPUs (the timer's business)
    spec_job, message = validate(job.body)
    if spec_job is None:
        _reject(job, message)
    else:
        launch(job, spec_job)
    job.status.apply(patch)


def respec(patch: kopf.Patch, **kwargs: Any) -> None:
    """Update of the spec: re-plan unless a gang is running (or the job succeeded)."""
    job = _job(kwargs)
    st = job.status
    if st.phase in ("Scheduling", "Running", "Succeeded"):
        job.event("SpecChangeIgnored", f"spec changed while {st.phase}: the job keeps running generation "
                  f"{st.get('observedGeneration')}; edit it again once it has failed to re-plan", warning=True)
        return
    spec_job, message = validate(job.body)
    if spec_job is None:
        _reject(job, message)
    else:
        _stop(job, [p for p in job.kube.list("Pod", job.namespace, {ch.LABEL_JOB: job.name})
                    if _controlled_by(p, job.owner.uid)])
        st.set(phase="Planning", completionTime=None, excludedNodes=[], startTime=_stamp(job.now))
        st.condition("Valid", "True", "Valid", "spec is valid")
        st.condition("Failed", "False", "SpecChanged", "the spec changed; planning again")
        launch(job, spec_job)
    st.apply(patch)


def reconcile(patch: kopf.Patch, **kwargs: Any) -> None:
    """Timer: deadline, re-planning while waiting for GPUs, the pods of the current attempt, TTL."""
    job = _job(kwargs)
    st = job.status
    if st.phase == "Pending":
        return  # admit's business
    spec_job, _ = validate(job.body)
    if st.phase in FINAL:
        ttl = spec_job.spec.ttl_seconds_after_finished if spec_job else None
        _expire(job, ttl)
        return
    if spec_job is None:
        return  # the create/update handlers report invalid specs
    if _deadline_passed(job, spec_job):
        pods = job.kube.list("Pod", job.namespace, {ch.LABEL_JOB: job.name})
        _fail(job, "DeadlineExceeded",
              f"activeDeadlineSeconds ({spec_job.spec.active_deadline_seconds}) exceeded in phase {st.phase}",
              [p for p in pods if _controlled_by(p, job.owner.uid)])
    elif st.phase == "Planning":
        planned = st.condition_of("Planned")
        if planned is not None and planned.get("status") == "False":
            since = _parse_time(planned.get("lastTransitionTime")) or job.now
            if job.now - since >= timedelta(seconds=job.runtime.settings.unschedulable_timeout):
                _fail(job, "Unschedulable", f"no GPUs for this job for "
                      f"{job.runtime.settings.unschedulable_timeout:g} s: {planned.get('message', '')}")
            else:
                launch(job, spec_job)
    else:
        watch_pods(job, spec_job)
    _progress_text(job)
    st.apply(patch)


# --- inventory indexes ------------------------------------------------------------------------------------


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


# --- startup and registration -----------------------------------------------------------------------------


def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Configure kopf from our settings; build the API adapter and detect Volcano once."""
    options = memo.get("options") or OperatorSettings()
    options.configure_kopf(settings)
    if not isinstance(memo.get("runtime"), Runtime):
        kube = Kube.from_environment(options.request_timeout)
        volcano = options.volcano == "on" or (
            options.volcano == "auto" and kube.has_resource("scheduling.volcano.sh/v1beta1", "podgroups"))
        memo.runtime = Runtime(options, kube, volcano)
    logger.info(f"stadi operator ready: volcano={memo.runtime.volcano}")


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
    for on in (kopf.on.create, kopf.on.resume):
        on(*JOBS, id="admit", backoff=backoff, registry=registry)(admit)
        on(*JOBS, id="plan", backoff=backoff, registry=registry)(plan)
    kopf.on.update(*JOBS, id="respec", field="spec", backoff=backoff, registry=registry)(respec)
    kopf.timer(*JOBS, id="reconcile", interval=settings.reconcile_interval, initial_delay=1.0,
               backoff=backoff, registry=registry)(reconcile)
    return registry
