"""The pod group of a DiffusionJob attempt, as plain manifests: pure functions, no API calls.

Children: ConfigMap ``<job>-plan`` (plan.json, job.json), headless Service ``<job>`` (rank 0's DNS name),
ServiceAccount/Role/RoleBinding ``<job>-worker`` (the Role allows only patching this job's status, for
progress), optionally a NetworkPolicy ``<job>-worker`` (the gang talks only to itself, DNS, the API server and
storage) and a Volcano PodGroup, and one worker pod per planned node running torchrun with one process per
planned GPU. A job in a Kueue queue also gets a Workload per attempt (``workload``), created before
the rest, which wait for Kueue to admit it. Every child carries a controller ownerReference to the job (kopf's),
so deleting the job deletes them (outputs in object storage stay).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from stadi import __version__
from stadi.api import API_VERSION, GROUP, DiffusionJobSpec, Plan
from stadi.policy import Limits
from stadi_operator.controller.inventory import DRA_INDICES_ANNOTATION, GPU_DRIVER, HOSTNAME_LABEL, PRODUCT_LABEL

APP = "stadi-worker"
# The worker image when neither the job nor the operator names one (the chart sets the operator's).
DEFAULT_WORKER_IMAGE = f"ghcr.io/stadi-dev/stadi-worker:{__version__}"
LABEL_APP = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "stadi.dev/job"
LABEL_ATTEMPT = "stadi.dev/attempt"
LABEL_POD_INDEX = "stadi.dev/pod-index"
ANNOTATION_ATTEMPT = "stadi.dev/attempt"
ANNOTATION_NODE = "stadi.dev/planned-node"
VOLCANO_GROUP = "scheduling.volcano.sh/group-name"
CONFIG_DIR = "/etc/stadi"
CACHE_DIR = "/var/cache/stadi"
MANAGER = "stadi-operator"


@dataclass(frozen=True)
class Owner:
    """The DiffusionJob the children belong to."""

    name: str
    namespace: str
    uid: str

    @property
    def body(self) -> kopf.Body:
        """The job as kopf's owner-reference helpers read it."""
        return kopf.Body({"apiVersion": API_VERSION, "kind": "DiffusionJob",
                          "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid}})


def owned(owner: Owner, obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the job as its controller (kopf's ownerReference, controller and blockOwnerDeletion set), so
    the garbage collector deletes it with the job.

    Not ``kopf.adopt``: it would also copy the job's labels (a Kueue queue name, say) onto the children, which
    carry our own labels only.
    """
    kopf.append_owner_reference(obj, owner.body)
    return obj


@dataclass(frozen=True)
class WorkerOptions:
    """Operator-wide choices that shape the worker pods."""

    image: str | None = None  # used when the job leaves spec.template.image unset
    port: int = 29500
    volcano: bool = False
    run_as_user: int = 1000
    progress_interval: float = 5.0
    # the volume source of the workers' cache (models, compiled artifacts): an emptyDir unless the operator
    # was given a node directory or a claim
    cache: Mapping[str, Any] = field(default_factory=lambda: {"emptyDir": {}})
    dra_device_class: str = "gpu.nvidia.com"  # the DeviceClass a pod on a DRA node claims its GPUs from
    limits: Limits = field(default_factory=Limits)  # the workers check promptsFrom against them
    # A NetworkPolicy per job when set: the egress rules besides the gang's (DNS, API server, storage), and the
    # port range of the ranks' collectives.
    egress: tuple[Mapping[str, Any], ...] | None = None
    collective_ports: tuple[int, int] = (32768, 60999)


@dataclass(frozen=True)
class PodSlot:
    """One worker pod: which node, which ranks (consecutive; the planner numbers them for launch)."""

    index: int
    node: str
    ranks: tuple[int, ...]

    @property
    def gpus(self) -> int:
        return len(self.ranks)


def pod_slots(plan: Plan) -> list[PodSlot]:
    """Group the plan's ranks by node, pods ordered by their first rank: pod 0 holds rank 0.

    torchrun numbers global ranks by node rank, then local rank, so this is only valid when each node's ranks
    are consecutive; the planner guarantees it and a violation is a bug worth failing loudly on.
    """
    slots: list[PodSlot] = []
    for r in sorted(plan.ranks, key=lambda r: r.rank):
        if r.node is None:
            raise ValueError(f"rank {r.rank} has no node; plans for a cluster need node names")
        if slots and slots[-1].node == r.node:
            last = slots[-1]
            slots[-1] = PodSlot(last.index, last.node, (*last.ranks, r.rank))
        else:
            if any(s.node == r.node for s in slots):
                raise ValueError(f"the ranks of node {r.node} are not consecutive in the plan")
            slots.append(PodSlot(len(slots), r.node, (r.rank,)))
    return slots


def labels(owner: Owner) -> dict[str, str]:
    return {LABEL_APP: APP, LABEL_MANAGED_BY: MANAGER, LABEL_JOB: owner.name}


def _meta(owner: Owner, name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": labels(owner), **extra}


def pod_name(job: str, attempt: int, index: int) -> str:
    return f"{job}-a{attempt}-{index}"


def worker_name(job: str) -> str:
    return f"{job}-worker"


def plan_name(job: str) -> str:
    return f"{job}-plan"


def pod_group_name(job: str, attempt: int) -> str:
    return f"{job}-a{attempt}"


def workload_name(job: str, attempt: int) -> str:
    return f"{job}-a{attempt}"


def rank0_address(job: str, namespace: str, attempt: int) -> str:
    """Rank 0's DNS name: pod hostname + subdomain under the headless Service ``<job>``."""
    return f"{pod_name(job, attempt, 0)}.{job}.{namespace}.svc"


def job_document(owner: Owner, spec: DiffusionJobSpec) -> dict[str, Any]:
    """The DiffusionJob as the worker reads it (job.json)."""
    return {
        "apiVersion": API_VERSION, "kind": "DiffusionJob",
        "metadata": {"name": owner.name, "namespace": owner.namespace},
        "spec": spec.dump(),
    }


def config_map(owner: Owner, spec: DiffusionJobSpec, plan: Plan, attempt: int) -> dict[str, Any]:
    """``<job>-plan``: the plan of the attempt (annotated with its number, which makes it the record a
    restarted operator reads back instead of planning again) and the job document."""
    return owned(owner, {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _meta(owner, plan_name(owner.name), annotations={ANNOTATION_ATTEMPT: str(attempt)}),
        "data": {
            "plan.json": plan.model_dump_json(indent=1),
            "job.json": json.dumps(job_document(owner, spec), indent=1),
        },
    })


def service(owner: Owner, attempt: int, port: int = 29500) -> dict[str, Any]:
    """Headless Service ``<job>``: gives each pod of the attempt a DNS name before it is ready (rendezvous
    happens before any readiness), hence publishNotReadyAddresses."""
    return owned(owner, {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(owner, owner.name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: owner.name, LABEL_ATTEMPT: str(attempt)},
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    })


def service_account(owner: Owner) -> dict[str, Any]:
    return owned(owner, {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": _meta(owner, worker_name(owner.name)),
        "automountServiceAccountToken": True,  # rank 0 patches status.progress with it
    })


def role(owner: Owner) -> dict[str, Any]:
    """Least privilege: patch the status of this one job, nothing else. Rank 0's reporter sends only merge
    patches of the status subresource (no read of the job, no list or watch: resourceNames cannot restrict
    those anyway)."""
    return owned(owner, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": _meta(owner, worker_name(owner.name)),
        "rules": [{
            "apiGroups": [GROUP], "resources": ["diffusionjobs/status"],
            "resourceNames": [owner.name], "verbs": ["patch"],
        }],
    })


def role_binding(owner: Owner) -> dict[str, Any]:
    return owned(owner, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _meta(owner, worker_name(owner.name)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": worker_name(owner.name)},
        "subjects": [{"kind": "ServiceAccount", "name": worker_name(owner.name), "namespace": owner.namespace}],
    })


def pod_group(owner: Owner, attempt: int, members: int) -> dict[str, Any]:
    """Volcano gang: no pod of the attempt starts until all of them can (minMember = pods)."""
    return owned(owner, {
        "apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup",
        "metadata": _meta(owner, pod_group_name(owner.name, attempt)),
        "spec": {"minMember": members},
    })


def _env(owner: Owner, spec: DiffusionJobSpec, attempt: int, slot: PodSlot,
         options: WorkerOptions) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "STADI_JOB_NAME", "value": owner.name},
        {"name": "STADI_JOB_NAMESPACE", "value": owner.namespace},
        {"name": "STADI_ATTEMPT", "value": str(attempt)},
        {"name": "STADI_POD_INDEX", "value": str(slot.index)},
        {"name": "STADI_OUTPUT", "value": spec.output.uri},
        {"name": "STADI_CACHE", "value": CACHE_DIR},
        {"name": "STADI_PROGRESS_INTERVAL", "value": f"{options.progress_interval:g}"},
        {"name": "STADI_MAX_PROMPTS", "value": str(options.limits.max_prompts)},
        {"name": "STADI_MAX_PROMPT_LENGTH", "value": str(options.limits.max_prompt_length)},
        {"name": "STADI_MAX_PROMPTS_FROM_BYTES", "value": str(options.limits.max_prompts_from_bytes)},
    ]
    if spec.output.endpoint:
        env.append({"name": "STADI_ENDPOINT", "value": spec.output.endpoint})
    if spec.output.credentials_secret:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": spec.output.credentials_secret, "key": key}}}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
    # CUDA_VISIBLE_DEVICES is deliberately absent: the device plugin sets it to the GPUs it allocated.
    return env


def network_policy(owner: Owner, options: WorkerOptions) -> dict[str, Any]:
    """The job's worker pods talk to each other (rendezvous and collectives, both ways) and, outbound, only where
    ``options.egress`` says (the chart's DNS, API server and storage rules). Never derived from the job: its
    endpoint is the tenant's word, and a rule made from it would open any address to the pods."""
    gang = {"podSelector": {"matchLabels": labels(owner)}}
    low, high = options.collective_ports
    ports = [{"protocol": "TCP", "port": options.port},
             {"protocol": "TCP", "port": low, **({"endPort": high} if high > low else {})}]
    return owned(owner, {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(owner, worker_name(owner.name)),
        "spec": {
            "podSelector": {"matchLabels": labels(owner)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [gang], "ports": ports}],
            "egress": [{"to": [gang], "ports": ports}, *(dict(rule) for rule in options.egress or ())],
        },
    })


def claim_template_name(pod: str) -> str:
    return f"{pod}-gpus"


def gpu_claim_template(owner: Owner, attempt: int, slot: PodSlot, indices: tuple[int, ...],
                       options: WorkerOptions) -> dict[str, Any]:
    """The ResourceClaimTemplate of a worker pod on a DRA node: exactly its planned GPUs, by their index on the
    node (the pod is pinned there, so the scheduler allocates from that node's slices only)."""
    listed = ", ".join(str(i) for i in indices)
    request = {"name": "gpus", "exactly": {
        "deviceClassName": options.dra_device_class, "allocationMode": "ExactCount", "count": len(indices),
        "selectors": [{"cel": {"expression": f'device.attributes["{GPU_DRIVER}"].index in [{listed}]'}}],
    }}
    name = claim_template_name(pod_name(owner.name, attempt, slot.index))
    return owned(owner, {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
        "metadata": _meta(owner, name, labels={**labels(owner), LABEL_ATTEMPT: str(attempt)}),
        "spec": {"spec": {"devices": {"requests": [request]}}},
    })


def worker_pod(owner: Owner, spec: DiffusionJobSpec, attempt: int, slot: PodSlot, pods: int,
               options: WorkerOptions, dra_indices: tuple[int, ...] = ()) -> dict[str, Any]:
    """One worker pod: pinned to its planned node, requesting exactly that node's planned GPUs: the extended
    resource of the device plugin, or on a DRA node (``dra_indices``) a claim of those devices from its
    template (``gpu_claim_template``), which the resourceclaim controller creates and the scheduler
    allocates."""
    template = spec.template
    name = pod_name(owner.name, attempt, slot.index)
    image = template.image or options.image or DEFAULT_WORKER_IMAGE
    gpu = {} if dra_indices else {template.gpu_resource: str(slot.gpus)}
    command = [
        "torchrun", f"--nnodes={pods}", f"--nproc-per-node={slot.gpus}", f"--node-rank={slot.index}",
        f"--master-addr={rank0_address(owner.name, owner.namespace, attempt)}",
        f"--master-port={options.port}", "--no-python",
        "stadi", "worker", "--plan", f"{CONFIG_DIR}/plan.json", "--job", f"{CONFIG_DIR}/job.json",
    ]
    pod_labels = {**labels(owner), LABEL_ATTEMPT: str(attempt), LABEL_POD_INDEX: str(slot.index)}
    annotations = {ANNOTATION_NODE: slot.node}
    spec_extra: dict[str, Any] = {}
    claims: dict[str, Any] = {}
    if dra_indices:
        annotations[DRA_INDICES_ANNOTATION] = ",".join(str(i) for i in dra_indices)
        spec_extra["resourceClaims"] = [{"name": "gpus", "resourceClaimTemplateName": claim_template_name(name)}]
        claims = {"claims": [{"name": "gpus"}]}
    if options.volcano:
        annotations[VOLCANO_GROUP] = pod_group_name(owner.name, attempt)
        spec_extra["schedulerName"] = "volcano"
    return owned(owner, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": owner.namespace, "labels": pod_labels, "annotations": annotations,
        },
        "spec": {
            "hostname": name,
            "subdomain": owner.name,
            "restartPolicy": "Never",
            "serviceAccountName": worker_name(owner.name),
            # Pinning by hostname, not by nodeName: the scheduler still checks resources and taints and reports
            # Unschedulable, which is what the gang timeout watches for.
            "nodeSelector": {**template.node_selector, "kubernetes.io/hostname": slot.node},
            "tolerations": [t.dump() for t in template.tolerations],
            "securityContext": {
                "runAsNonRoot": True, "runAsUser": options.run_as_user, "runAsGroup": options.run_as_user,
                "fsGroup": options.run_as_user, "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "worker",
                "image": image,
                "command": command,
                "env": _env(owner, spec, attempt, slot, options),
                "ports": [{"name": "rendezvous", "containerPort": options.port, "protocol": "TCP"}],
                "resources": {
                    "requests": {**template.resources.requests, **gpu},
                    "limits": {**template.resources.limits, **gpu},
                    **claims,
                },
                "volumeMounts": [
                    {"name": "stadi", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "cache", "mountPath": CACHE_DIR},
                    {"name": "dshm", "mountPath": "/dev/shm"},  # NCCL between the processes of one pod
                ],
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }],
            "volumes": [
                {"name": "stadi", "configMap": {"name": plan_name(owner.name)}},
                {"name": "cache", **options.cache},
                {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            ],
            **spec_extra,
        },
    })


def workload(owner: Owner, queue: str, attempt: int, pods: list[dict[str, Any]],
             priority: tuple[str, int] | None = None, products: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Kueue Workload of an attempt: what its worker pods request, for Kueue to weigh against the quota of
    ``queue`` (a LocalQueue) before any of them exists. Pods that request the same resources form one pod set
    (Kueue takes at most 8); the template keeps only what Kueue reads for quota: requests, node selector and
    tolerations. The planned node's GPU product (``products``: node → GFD's product label) joins the node
    selector, so a ClusterQueue whose ResourceFlavors are GPU products (their ``nodeLabels``) charges the plan's
    GPUs to their product's quota. ``priority``: a WorkloadPriorityClass's name and value."""
    sets: dict[str, dict[str, Any]] = {}
    for pod in pods:
        spec = pod["spec"]
        container = spec["containers"][0]
        selector = {k: v for k, v in spec["nodeSelector"].items() if k != HOSTNAME_LABEL}
        if product := (products or {}).get(spec["nodeSelector"].get(HOSTNAME_LABEL, "")):
            selector[PRODUCT_LABEL] = product
        template = {"spec": {
            "restartPolicy": "Never", "nodeSelector": selector,
            "tolerations": spec["tolerations"],
            "containers": [{"name": container["name"], "image": container["image"],
                            "resources": {k: v for k, v in container["resources"].items() if k != "claims"}}],
        }}
        key = json.dumps(template, sort_keys=True)
        entry = sets.setdefault(key, {"name": f"workers-{len(sets)}", "count": 0, "template": template})
        entry["count"] += 1
    body: dict[str, Any] = {"queueName": queue, "podSets": list(sets.values())}
    if priority is not None:
        body |= {"priorityClassRef": {"group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass",
                                      "name": priority[0]}, "priority": priority[1]}
    return owned(owner, {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
                         "metadata": _meta(owner, workload_name(owner.name, attempt)), "spec": body})


def children(owner: Owner, spec: DiffusionJobSpec, plan: Plan, attempt: int, options: WorkerOptions,
             dra_nodes: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Everything an attempt needs, in creation order: identity and RBAC, the NetworkPolicy (before any pod, so
    none runs unfenced), plan, Service, gang, the GPU claim templates of the pods on DRA nodes (``dra_nodes``),
    pods."""
    slots = pod_slots(plan)
    indices = {s.index: tuple(plan.ranks[r].gpu_index or 0 for r in s.ranks) if s.node in dra_nodes else ()
               for s in slots}
    pods = [worker_pod(owner, spec, attempt, s, len(slots), options, indices[s.index]) for s in slots]
    claims = [gpu_claim_template(owner, attempt, s, indices[s.index], options) for s in slots if indices[s.index]]
    group = [pod_group(owner, attempt, len(pods))] if options.volcano else []
    fence = [network_policy(owner, options)] if options.egress is not None else []
    return [
        service_account(owner), role(owner), role_binding(owner), *fence, config_map(owner, spec, plan, attempt),
        service(owner, attempt, options.port), *group, *claims, *pods,
    ]
