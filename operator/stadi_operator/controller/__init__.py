"""The DiffusionJob controller: kopf handlers that validate, plan, create the pod group, watch it, recover, finish.

Lifecycle (``status.phase``)::

    Pending --admit--> Planning --plan--> Scheduling --pods bound and running--> Running --all done--> Succeeded
       |                  ^   |                 |                                   |
       +--> Failed        |   +--(no GPUs: waits, then Failed/Unschedulable)        |
          (InvalidSpec)   +------- a pod failed / gang unschedulable: re-plan -------+--> Failed (backoff,
                                   without those nodes, attempt + 1                        deadline, ...)

    spec.suspend true: Planning/Scheduling/Running --> Suspended (pods stopped); false: --> Planning, attempt + 1

    In a Kueue queue (label kueue.x-k8s.io/queue-name): plan --> Queued (the attempt's Workload created, no pods)
    --Kueue admits it--> Scheduling; Kueue evicts it --> pods stopped, Workload deleted, the next attempt Queued

* ``admit`` and ``plan`` are two create/resume handlers: kopf runs one per cycle and applies its status patch
  before the next, so Planning is visible while the planner runs.
* ``reconcile`` is a timer: it lists the job's pods and moves the phase; it is level-triggered, so an operator
  restarted at any point picks up where the last one stopped.
* Children are created idempotently: looked up first, a 409 means another run got there first and the object is
  adopted. The ConfigMap ``<job>-plan`` records the attempt number with its plan; a restarted operator that finds
  the ConfigMap of the attempt it is about to start reuses that plan instead of planning again, so the pods it
  creates (deterministic names) are exactly the ones a crashed predecessor may already have created.
* Spec updates while Pending/Planning/Failed re-validate and re-plan. ``spec.suspend`` is obeyed in any phase but
  the final ones (a resume's attempt is counted in ``status.resumes``, not as a retry). Other changes while
  Scheduling/Running/Succeeded are ignored with a ``SpecChangeIgnored`` event: the gang runs the spec it started
  with (its job.json), and ``status.observedGeneration`` stays behind ``metadata.generation`` to show it.
* Retries (``spec.backoffLimit``) are counted over the job's life by ``status.attempts`` (attempt numbers name
  the pods, so they never restart). Editing the spec of a Failed job starts one new attempt; retrying after that
  one fails needs a ``backoffLimit`` above the attempts made.
* Pod changes are seen by the timer, every ``reconcileInterval`` seconds (default 5): one writer of the status,
  level-triggered, at the cost of up to one interval of latency per transition.
* Terminated pods of failed attempts are kept (their logs explain the failure); the garbage collector removes
  them with the job.

Modules, each importing only those above it:

- ``inventory``: the cluster's free GPUs from Nodes or DRA ResourceSlices, pods, ResourceClaims and GPUNodes
  (pure).
- ``children``: the manifests of an attempt's children (pure).
- ``status``: one handler run's status changes, conditions and timestamps.
- ``pods``: what a worker pod's object says (phase, attempt, node, why it failed; pure).
- ``metrics``: the operator's Prometheus metrics (one registry per runtime).
- ``gpu_book``: GPUs promised to just-created pods until kopf's pod index shows them or their job sees them finished.
- ``indexes``: kopf's inventory indexes and the planner devices they offer a job.
- ``runtime``: what every handler needs (settings, API adapter, book, clock) and one run's view of a job.
- ``learning``: speeds measured by finished jobs, written to the GPUNodes and taken by later plans.
- ``admission``: the spec checked by the pydantic model, and the InvalidSpec verdict.
- ``adoption``: create a child unless it exists, adopt an orphan, read back a committed plan.
- ``queueing``: Kueue: the attempt's Workload, whether it is admitted or evicted, its release.
- ``launch``: start an attempt: plan (or adopt the committed plan), wait for Kueue if queued, create its children.
- ``lifecycle``: the pods of an attempt move the phase: retry, fail, succeed, suspend, resume, deadline, TTL.
- ``handlers``: the thin kopf handlers and :func:`~stadi_operator.controller.handlers.register`.
"""
