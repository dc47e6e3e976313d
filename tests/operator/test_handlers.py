"""The DiffusionJob handlers against kmock, kopf's Kubernetes API emulator.

The handler functions are called the way kopf calls them (keyword arguments, a ``kopf.Patch`` applied to the
object afterwards), in a thread as kopf runs sync handlers, while kmock serves the API in the test's loop:
children, pods and events go through real HTTP to the emulator. Time is a fake clock in the runtime.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import kmock as kmocklib
import kopf
import pytest
from stadi_operator.controller import handlers
from stadi_operator.controller.adoption import ensure
from stadi_operator.controller.gpu_book import GpuBook
from stadi_operator.controller.inventory import PodUsage, node_info, pod_usage, slice_gpus
from stadi_operator.controller.inventory import telemetry as inventory_telemetry
from stadi_operator.controller.runtime import Runtime
from stadi_operator.devcluster.nodes import GPUNodeSpec
from stadi_operator.kube import Kube
from stadi_operator.settings import OperatorSettings

NS = "team-a"
JOB = "stadi.dev/v1alpha1/diffusionjobs"
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
pytestmark = pytest.mark.asyncio

RESOURCES = ("v1/pods", "v1/configmaps", "v1/services", "v1/serviceaccounts", "v1/events",
             "rbac.authorization.k8s.io/v1/roles", "rbac.authorization.k8s.io/v1/rolebindings",
             "resource.k8s.io/v1/resourceclaimtemplates", "kueue.x-k8s.io/v1beta2/workloads", JOB)
WORKLOADS = "kueue.x-k8s.io/v1beta2/workloads"
GPUNODES = "stadi.dev/v1alpha1/gpunodes"


def gpu_node(name: str, gpus: int, product: str = "NVIDIA-H100-80GB-HBM3") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product, "kubernetes.io/hostname": name}},
        "spec": {},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}, "conditions": [{"type": "Ready", "status": "True"}]},
    }


class Cluster:
    """kmock plus the operator's runtime and kopf-like calls of the handlers."""

    def __init__(self, server: kmocklib.KubernetesEmulator) -> None:
        self.server = server
        self.now = T0
        self.settings = OperatorSettings(unschedulable_timeout=120, telemetry_stale_after=60)
        self.runtime = Runtime(self.settings, Kube.for_host(str(server.url).rstrip("/"), timeout=10),
                               clock=lambda: self.now)
        self.nodes = [gpu_node("gpu-a", 1), gpu_node("gpu-b", 2)]
        self.slices: list[dict[str, Any]] = []  # DRA ResourceSlices (GPUNodeSpec.resource_slice)
        self.foreign_pods: list[dict[str, Any]] = []
        for resource in RESOURCES:
            server.resources[resource] = kmocklib.ResourceInfo(namespaced=True)
        server.resources[GPUNODES] = kmocklib.ResourceInfo(namespaced=False)

    # --- objects ---

    def add_job(self, name: str = "cats", **spec: Any) -> None:
        body = {
            "apiVersion": "stadi.dev/v1alpha1", "kind": "DiffusionJob",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1},
            "spec": {"model": {"family": "sdxl", "source": "random://tiny"}, "prompts": ["a cat", "a dog"],
                     "output": {"uri": "s3://bucket/cats"}, **spec},
        }
        self.server.objects[JOB, NS, name] = body

    def job(self, name: str = "cats") -> dict[str, Any]:
        return copy.deepcopy(self.server.objects[JOB, NS, name].raw)

    def status(self, name: str = "cats") -> dict[str, Any]:
        return self.job(name).get("status", {})

    def condition(self, kind: str, name: str = "cats") -> dict[str, Any]:
        return next(c for c in self.status(name)["conditions"] if c["type"] == kind)

    def phases(self, name: str = "cats") -> list[str]:
        """Every phase the job's status went through, in order, without repeats."""
        seen: list[str] = ["Pending"]
        for version in self.server.objects[JOB, NS, name].history:
            phase = (version or {}).get("status", {}).get("phase") if version is not None else None
            if phase and phase != seen[-1]:
                seen.append(phase)
        return seen

    def live(self, resource: str) -> dict[str, dict[str, Any]]:
        return {name: dict(obj.raw) for (res, ns, name), obj in self.server.objects.items()
                if res == kmocklib.resource(resource) and not obj.deleted}

    def pods(self) -> dict[str, dict[str, Any]]:
        return self.live("v1/pods")

    def events(self) -> list[tuple[str, str]]:
        return [(e["reason"], e["message"]) for e in self.live("v1/events").values()]

    def reasons(self) -> list[str]:
        return sorted(reason for reason, _ in self.events())

    def creations(self, resource: str) -> int:
        return sum(1 for req in self.server
                   if req.method == "POST" and req.resource == kmocklib.resource(resource))

    def set_pod(self, name: str, phase: str, *, node: str | None = None, **status: Any) -> None:
        obj = self.server.objects["v1/pods", NS, name]
        planned = obj["metadata"]["annotations"]["stadi.dev/planned-node"]
        obj.patch({"spec": {"nodeName": node or planned}, "status": {"phase": phase, **status}})

    # --- handlers ---

    def indexes(self) -> dict[str, Any]:
        pods: dict[str, list[PodUsage]] = {}
        for body in [*self.pods().values(), *self.foreign_pods]:
            found = pod_usage(body)
            if found:
                pods.setdefault(found[0], []).append(found[1])
        slices: dict[str, list[Any]] = {}
        for found in filter(None, map(slice_gpus, self.slices)):
            slices.setdefault(found[0], []).append(found[1])
        telemetry = {found.node: [found] for found in map(inventory_telemetry, self.live(GPUNODES).values())
                     if found is not None}
        return {"stadi_nodes": {n["metadata"]["name"]: [node_info(n)] for n in self.nodes},
                "stadi_gpu_pods": pods, "stadi_telemetry": telemetry, "stadi_gpu_slices": slices}

    async def call(self, handler: Callable[..., None], name: str = "cats", *, apply: bool = True) -> kopf.Patch:
        """Run a handler as kopf would (sync handlers in a thread) and apply its patch to the object."""
        body = self.job(name)
        patch = kopf.Patch()
        await asyncio.to_thread(
            handler, patch=patch, body=body, spec=body["spec"], status=body.get("status", {}),
            meta=body["metadata"], name=name, namespace=NS, uid=body["metadata"]["uid"],
            memo=kopf.Memo(runtime=self.runtime), logger=logging.getLogger("test"), **self.indexes(),
        )
        if apply and patch:
            self.server.objects[JOB, NS, name].patch(copy.deepcopy(dict(patch)))
        return patch

    async def create(self, name: str = "cats") -> None:
        """kopf's create cycle: admit, then plan, each patch applied before the next handler."""
        await self.call(handlers.admit, name)
        await self.call(handlers.plan, name)


@pytest.fixture
def cluster(kmock: kmocklib.KubernetesEmulator) -> Cluster:
    return Cluster(kmock)


async def test_create_plans_and_creates_the_children_once(cluster: Cluster) -> None:
    # every GPU of both nodes (the planner alone would take 2 of the 3 H100s: cfg pays no band exchange)
    cluster.add_job(parallelism={"gpus": {"min": 3}})
    await cluster.call(handlers.admit)
    assert cluster.status()["phase"] == "Planning"
    await cluster.call(handlers.plan)

    status = cluster.status()
    assert status["phase"] == "Scheduling"
    assert status["attempts"] == 1 and status["gpus"] == 3 and status["strategy"] == status["plan"]["strategy"]
    assert {r["node"] for r in status["plan"]["ranks"]} == {"gpu-a", "gpu-b"}
    assert cluster.condition("Planned")["status"] == "True"
    assert sorted(cluster.pods()) == ["cats-a1-0", "cats-a1-1"]
    gpus = {p["spec"]["nodeSelector"]["kubernetes.io/hostname"]:
            p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for p in cluster.pods().values()}
    assert gpus == {"gpu-a": "1", "gpu-b": "2"}
    for resource, name in (("v1/configmaps", "cats-plan"), ("v1/services", "cats"),
                           ("v1/serviceaccounts", "cats-worker"), ("rbac.authorization.k8s.io/v1/roles", "cats-worker"),
                           ("rbac.authorization.k8s.io/v1/rolebindings", "cats-worker")):
        assert list(cluster.live(resource)) == [name]
    assert cluster.reasons() == ["Planned"]

    # A second run of the create/resume handlers (kopf retrying, or a restarted operator) creates nothing.
    posts = len([r for r in list(cluster.server) if r.method == "POST"])
    await cluster.call(handlers.admit)
    await cluster.call(handlers.plan)
    assert len([r for r in list(cluster.server) if r.method == "POST"]) == posts
    assert cluster.creations("v1/pods") == 2


async def test_restart_before_the_status_was_written_adopts_instead_of_duplicating(cluster: Cluster) -> None:
    cluster.add_job()
    await cluster.call(handlers.admit)
    # The operator created the children, then died before kopf applied the status patch.
    await cluster.call(handlers.plan, apply=False)
    assert cluster.status()["phase"] == "Planning"
    # Meanwhile the inventory changed (the operator's own pods now hold the GPUs): a fresh plan would differ.
    cluster.nodes.append(gpu_node("gpu-c", 4))
    before = {name: cluster.creations(name) for name in RESOURCES}
    # One child was also left without its owner reference (e.g. created by hand): it is adopted.
    cm = cluster.server.objects["v1/configmaps", NS, "cats-plan"]
    del cm["metadata"]["ownerReferences"]
    cm.patch({"metadata": {"ownerReferences": None}})

    await cluster.call(handlers.plan)  # the restarted operator resumes

    assert {name: cluster.creations(name) for name in RESOURCES} == before
    status = cluster.status()
    assert status["phase"] == "Scheduling" and status["attempts"] == 1
    assert {r["node"] for r in status["plan"]["ranks"]} == {"gpu-a", "gpu-b"}  # the committed plan, not a new one
    assert cluster.live("v1/configmaps")["cats-plan"]["metadata"]["ownerReferences"][0]["uid"] == "uid-cats"
    assert cluster.reasons() == ["Planned"]  # no second Planned event for the adopted plan


async def test_409_on_create_adopts_the_object_that_won_the_race(cluster: Cluster) -> None:
    cluster.add_job()
    await cluster.call(handlers.admit)
    from stadi_operator.controller import children as ch

    owner = ch.Owner("cats", NS, "uid-cats")
    sa = ch.service_account(owner)
    # The lookup says "absent", the create says "exists": what another writer does between the two.
    key = ("v1/serviceaccounts", NS, "cats-worker")
    lookups: list[int] = []

    def racing_lookup() -> dict[str, Any]:
        lookups.append(1)
        if len(lookups) == 1:
            cluster.server.objects[key] = sa  # the other writer wins now
            raise kmocklib.KubernetesObjectNotFoundError()
        return cluster.server.objects[key].raw

    cluster.server["get", kmocklib.resource("v1/serviceaccounts"), kmocklib.name("cats-worker")] << racing_lookup
    obj, what = await asyncio.to_thread(ensure, cluster.runtime.kube, sa, owner)
    assert what == "exists" and obj["metadata"]["name"] == "cats-worker"
    assert cluster.creations("v1/serviceaccounts") == 1  # the one that got 409
    assert len(lookups) == 2


async def test_adoption_keeps_other_owners_and_children_keep_their_own_labels(cluster: Cluster) -> None:
    """An orphan child with a non-controller owner is adopted beside it; the job's own labels never reach its
    children (a Kueue queue name there would make Kueue gate the pods themselves)."""
    cluster.add_job()
    cluster.server.objects[JOB, NS, "cats"].patch({"metadata": {"labels": {"team": "vision"}}})
    other = {"apiVersion": "v1", "kind": "ConfigMap", "name": "keeper", "uid": "uid-keeper"}
    cluster.server.objects["v1/serviceaccounts", NS, "cats-worker"] = {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "cats-worker", "namespace": NS, "ownerReferences": [other]}}
    await cluster.create()

    refs = cluster.live("v1/serviceaccounts")["cats-worker"]["metadata"]["ownerReferences"]
    assert refs == [other, {"apiVersion": "stadi.dev/v1alpha1", "kind": "DiffusionJob", "name": "cats",
                            "uid": "uid-cats", "controller": True, "blockOwnerDeletion": True}]
    for pod in cluster.pods().values():
        assert "team" not in pod["metadata"]["labels"]
        assert pod["metadata"]["labels"]["stadi.dev/job"] == "cats"


async def test_status_goes_pending_planning_scheduling_running_succeeded(cluster: Cluster) -> None:
    cluster.add_job()
    await cluster.create()
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Scheduling"  # pods still pending

    cluster.set_pod("cats-a1-0", "Running")
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Scheduling"  # the gang runs only when all its pods do
    cluster.set_pod("cats-a1-1", "Running")
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Running"
    assert cluster.condition("Scheduled")["status"] == "True"

    cluster.server.objects[JOB, NS, "cats"].patch(
        {"status": {"progress": {"imagesDone": 1, "imagesTotal": 2}}})  # what rank 0 reports
    cluster.set_pod("cats-a1-0", "Succeeded")
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Running"
    assert cluster.status()["progressText"] == "1/2 images"
    cluster.set_pod("cats-a1-1", "Succeeded")
    cluster.now += timedelta(seconds=30)
    await cluster.call(handlers.reconcile)

    status = cluster.status()
    assert cluster.phases() == ["Pending", "Planning", "Scheduling", "Running", "Succeeded"]
    assert status["outputs"] == ["s3://bucket/cats/manifest.json"]
    assert status["completionTime"] == "2025-01-01T12:00:30Z"
    assert status["observedGeneration"] == 1
    complete = cluster.condition("Complete")
    assert (complete["status"], complete["reason"], complete["observedGeneration"]) == ("True", "Succeeded", 1)
    assert cluster.reasons() == ["Planned", "Scheduled", "Succeeded"]


async def test_success_keeps_the_workers_progress_and_measurements(cluster: Cluster) -> None:
    cluster.add_job()
    await cluster.create()
    for pod in ("cats-a1-0", "cats-a1-1"):
        cluster.set_pod(pod, "Running")
    await cluster.call(handlers.reconcile)
    measured = [{"rank": 0, "stepMs": [10.0, 11.0], "medianMs": 10.5}, {"rank": 1, "stepMs": [20.0], "medianMs": 20.0}]
    job = cluster.server.objects[JOB, NS, "cats"]
    job.patch({"status": {"progress": {"step": 8, "steps": 8, "imagesDone": 2, "imagesTotal": 2},
                          "progressText": "2/2 images", "measured": measured}})  # rank 0's last PATCH
    for pod in ("cats-a1-0", "cats-a1-1"):
        cluster.set_pod(pod, "Succeeded")
    patch = await cluster.call(handlers.reconcile)

    assert cluster.status()["phase"] == "Succeeded"
    assert not {"progress", "progressText", "measured"} & set(patch.get("status", {}))  # nothing to write
    status = cluster.status()
    assert status["progress"] == {"step": 8, "steps": 8, "imagesDone": 2, "imagesTotal": 2}
    assert status["progressText"] == "2/2 images" and status["measured"] == measured


async def test_success_completes_progress_whose_last_patch_was_lost(cluster: Cluster) -> None:
    cluster.add_job()
    await cluster.create()
    cluster.server.objects[JOB, NS, "cats"].patch(
        {"status": {"progress": {"step": 3, "steps": 8, "imagesDone": 1, "imagesTotal": 2},
                    "progressText": "1/2 images"}})
    for pod in ("cats-a1-0", "cats-a1-1"):
        cluster.set_pod(pod, "Succeeded")
    await cluster.call(handlers.reconcile)
    status = cluster.status()
    assert status["phase"] == "Succeeded"
    assert status["progress"] == {"step": 8, "steps": 8, "imagesDone": 2, "imagesTotal": 2}
    assert status["progressText"] == "2/2 images"


async def test_a_failed_pod_replans_without_its_node(cluster: Cluster) -> None:
    cluster.nodes.append(gpu_node("gpu-c", 2))
    cluster.add_job()
    await cluster.create()
    assert "gpu-b" in {r["node"] for r in cluster.status()["plan"]["ranks"]}
    failing = next(n for n, p in cluster.pods().items()
                   if p["spec"]["nodeSelector"]["kubernetes.io/hostname"] == "gpu-b")
    for name in cluster.pods():
        cluster.set_pod(name, "Running")
    await cluster.call(handlers.reconcile)
    cluster.set_pod(failing, "Failed", containerStatuses=[
        {"name": "worker", "state": {"terminated": {"reason": "Error", "exitCode": 1, "message": "NCCL timeout"}}}])

    await cluster.call(handlers.reconcile)

    status = cluster.status()
    assert status["attempts"] == 2 and status["phase"] == "Scheduling"
    assert status["excludedNodes"] == ["gpu-b"]
    planned = {r["node"] for r in status["plan"]["ranks"]}
    assert "gpu-b" not in planned and "gpu-c" in planned
    live = {n: p for n, p in cluster.pods().items()}
    attempt2 = {n for n in live if n.startswith("cats-a2-")}
    assert {live[n]["spec"]["nodeSelector"]["kubernetes.io/hostname"] for n in attempt2} == planned
    # The attempt's running pods were deleted; the failed one stays for its logs.
    assert {n for n in live if n.startswith("cats-a1-")} == {failing}
    assert cluster.live("v1/services")["cats"]["spec"]["selector"]["stadi.dev/attempt"] == "2"
    cm = cluster.live("v1/configmaps")["cats-plan"]
    assert cm["metadata"]["annotations"]["stadi.dev/attempt"] == "2" and "gpu-b" not in cm["data"]["plan.json"]
    failed = [m for r, m in cluster.events() if r == "PodFailed"]
    assert failed and "gpu-b" in failed[0] and "NCCL timeout" in failed[0]
    assert cluster.reasons() == ["Planned", "PodFailed", "Replanned", "Scheduled"]


async def test_backoff_limit_exhausted_fails_the_job(cluster: Cluster) -> None:
    cluster.add_job(backoffLimit=0)
    await cluster.create()
    cluster.set_pod("cats-a1-0", "Failed", reason="Evicted", message="node was low on memory")
    cluster.set_pod("cats-a1-1", "Running")

    await cluster.call(handlers.reconcile)

    status = cluster.status()
    assert status["phase"] == "Failed" and status["attempts"] == 1
    failed = cluster.condition("Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "backoffLimit 0" in failed["message"] and "Evicted" in failed["message"]
    assert sorted(cluster.pods()) == ["cats-a1-0"]  # the running pod was stopped
    # Finished: further ticks change nothing.
    requests = len(list(cluster.server))
    await cluster.call(handlers.reconcile)
    assert len([r for r in list(cluster.server)[requests:] if r.method != "GET"]) == 0


async def test_unschedulable_past_the_timeout_replans_with_fewer_gpus(cluster: Cluster) -> None:
    cluster.add_job()
    await cluster.create()
    unschedulable = {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "lastTransitionTime": "2025-01-01T12:00:00Z",
                                     "message": "0/2 nodes are available: insufficient nvidia.com/gpu"}]}
    cluster.server.objects["v1/pods", NS, "cats-a1-1"].patch({"status": {"phase": "Pending", **unschedulable}})
    cluster.set_pod("cats-a1-0", "Running")

    cluster.now = T0 + timedelta(seconds=60)
    await cluster.call(handlers.reconcile)
    assert cluster.status()["attempts"] == 1  # within the timeout: wait

    cluster.now = T0 + timedelta(seconds=121)
    await cluster.call(handlers.reconcile)
    status = cluster.status()
    assert status["attempts"] == 2 and status["excludedNodes"] == ["gpu-b"] and status["gpus"] == 1
    assert sorted(n for n in cluster.pods() if n.startswith("cats-a2")) == ["cats-a2-0"]
    assert "Unschedulable" in cluster.reasons() and "Replanned" in cluster.reasons()


async def test_unschedulable_with_no_other_gpus_fails_with_reason_unschedulable(cluster: Cluster) -> None:
    cluster.nodes = [gpu_node("gpu-a", 2)]
    cluster.add_job()
    await cluster.create()
    for name in cluster.pods():
        cluster.server.objects["v1/pods", NS, name].patch({"status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "lastTransitionTime": "2025-01-01T12:00:00Z"}]}})
    cluster.now = T0 + timedelta(seconds=300)
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Failed"
    assert cluster.condition("Failed")["reason"] == "Unschedulable"


async def test_no_gpus_waits_in_planning_then_fails_unschedulable(cluster: Cluster) -> None:
    cluster.nodes = []
    cluster.add_job()
    await cluster.create()
    assert cluster.status()["phase"] == "Planning"
    planned = cluster.condition("Planned")
    assert (planned["status"], planned["reason"]) == ("False", "NoCapacity")
    assert cluster.pods() == {}

    cluster.now += timedelta(seconds=30)
    cluster.nodes = [gpu_node("gpu-a", 1)]  # a GPU appears: the timer plans
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Scheduling" and list(cluster.pods()) == ["cats-a1-0"]

    cluster.add_job("dogs")
    cluster.nodes = []
    await cluster.create("dogs")
    cluster.now += timedelta(seconds=121)
    await cluster.call(handlers.reconcile, "dogs")
    assert cluster.status("dogs")["phase"] == "Failed"
    assert cluster.condition("Failed", "dogs")["reason"] == "Unschedulable"


async def test_invalid_spec_fails_once_with_the_validation_message(cluster: Cluster) -> None:
    cluster.add_job(steps=10, parallelism={"minEffectiveSteps": 20})  # slips past the schema: cross-field
    await cluster.create()

    status = cluster.status()
    assert status["phase"] == "Failed"
    valid = cluster.condition("Valid")
    assert (valid["status"], valid["reason"]) == ("False", "InvalidSpec")
    assert "spec.parallelism.minEffectiveSteps: must be <= steps (10), got 20" in valid["message"]
    assert cluster.reasons() == ["InvalidSpec"]
    assert cluster.pods() == {}
    # No retry loop: the handlers returned normally (kopf marks them done), and later runs do nothing.
    await cluster.call(handlers.admit)
    await cluster.call(handlers.plan)
    await cluster.call(handlers.reconcile)
    assert cluster.reasons() == ["InvalidSpec"]
    assert [r.method for r in list(cluster.server) if r.method != "GET"] == ["POST"]  # the one event


async def test_a_flux_job_is_admitted_and_planned_without_guidance_branches(cluster: Cluster) -> None:
    """FLUX.1 (guidance-distilled) runs: admitted, planned on the GPUs with one branch per step."""
    cluster.add_job(model={"family": "flux", "source": "random://tiny"}, guidanceScale=3.5)
    await cluster.create()
    assert cluster.condition("Valid")["status"] == "True"
    plan = cluster.status()["plan"]
    assert plan["family"] == "flux" and plan["guidance"] is False
    assert {r["branch"] for r in plan["ranks"]} == {"both"} and cluster.pods()


async def test_fixing_the_spec_of_a_failed_job_replans(cluster: Cluster) -> None:
    cluster.add_job(steps=10, parallelism={"minEffectiveSteps": 20})
    await cluster.create()
    job = cluster.server.objects[JOB, NS, "cats"]
    job.patch({"metadata": {"generation": 2}, "spec": {"parallelism": {"minEffectiveSteps": 5}}})
    await cluster.call(handlers.respec)
    status = cluster.status()
    assert status["phase"] == "Scheduling" and status["observedGeneration"] == 2
    assert cluster.condition("Valid")["status"] == "True"
    assert cluster.condition("Failed")["status"] == "False"
    assert "completionTime" not in status


async def test_spec_change_while_running_is_ignored_with_an_event(cluster: Cluster) -> None:
    cluster.add_job()
    await cluster.create()
    cluster.server.objects[JOB, NS, "cats"].patch({"metadata": {"generation": 2}, "spec": {"steps": 30}})
    patch = await cluster.call(handlers.respec)
    assert not patch
    assert cluster.status()["observedGeneration"] == 1
    assert "SpecChangeIgnored" in cluster.reasons()
    assert cluster.creations("v1/pods") == 2


async def test_deadline_exceeded_stops_the_pods_and_fails(cluster: Cluster) -> None:
    cluster.add_job(activeDeadlineSeconds=600)
    await cluster.create()
    for name in cluster.pods():
        cluster.set_pod(name, "Running")
    cluster.now = T0 + timedelta(seconds=601)
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Failed"
    assert cluster.condition("Failed")["reason"] == "DeadlineExceeded"
    assert cluster.pods() == {}
    assert "DeadlineExceeded" in cluster.reasons()


async def test_ttl_after_finished_deletes_the_job(cluster: Cluster) -> None:
    cluster.add_job(ttlSecondsAfterFinished=60)
    cluster.server.objects[JOB, NS, "cats"].patch(
        {"status": {"phase": "Succeeded", "completionTime": "2025-01-01T12:00:00Z"}})
    cluster.now = T0 + timedelta(seconds=59)
    await cluster.call(handlers.reconcile)
    assert cluster.server.objects[JOB, NS, "cats"].deleted is False
    cluster.now = T0 + timedelta(seconds=60)
    await cluster.call(handlers.reconcile, apply=False)
    assert cluster.server.objects[JOB, NS, "cats"].deleted is True


async def test_a_missing_pod_counts_as_a_failure_of_its_node(cluster: Cluster) -> None:
    cluster.add_job()
    await cluster.create()
    del cluster.server.objects["v1/pods", NS, "cats-a1-0"]  # evicted and deleted by someone
    await cluster.call(handlers.reconcile)
    status = cluster.status()
    assert status["excludedNodes"] == ["gpu-a"] and status["attempts"] == 2
    assert any("is gone" in m for r, m in cluster.events() if r == "PodFailed")


async def test_other_pods_gpus_are_not_planned(cluster: Cluster) -> None:
    cluster.foreign_pods = [{
        "metadata": {"name": "other", "namespace": "x", "labels": {}},
        "spec": {"nodeName": "gpu-b", "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "2"}}}]},
        "status": {"phase": "Running"},
    }]
    cluster.add_job()
    await cluster.create()
    assert {r["node"] for r in cluster.status()["plan"]["ranks"]} == {"gpu-a"}


async def test_registration_wires_every_handler() -> None:
    registry = handlers.register(kopf.OperatorRegistry(), OperatorSettings(reconcile_interval=7))
    ids = {h.id for h in registry._changing.get_all_handlers()}
    assert ids == {"admit", "plan", "respec/spec", "forget"}
    timers = list(registry._spawning.get_all_handlers())
    assert [(t.id, t.interval) for t in timers] == [("reconcile", 7)]
    assert {h.id for h in registry._indexing.get_all_handlers()} == {"stadi_nodes", "stadi_gpu_pods",
                                                                     "stadi_telemetry", "stadi_gpu_slices",
                                                                     "stadi_gpu_claims"}
    # A registry of our own has no login handler unless register() adds one: without it kopf cannot connect.
    logins = list(registry._activities.get_all_handlers())
    assert [h.fn for h in logins if h.activity.value == "authentication"] == [kopf.login_via_client]


async def test_gpu_book_holds_created_pods_until_the_index_shows_them() -> None:
    """Pods created by one launch count against their node for the next launch even before the pod index
    has them (jobs applied at once must not all pick the same free GPUs), and only once after it does."""
    book = GpuBook()
    pod = {"metadata": {"name": "j-a1-0", "namespace": "ns", "labels": {"stadi.dev/job": "j"}},
           "spec": {"nodeSelector": {"kubernetes.io/hostname": "gpu-a"},
                    "containers": [{"name": "worker", "resources": {"limits": {"nvidia.com/gpu": "2"}}}]}}
    with book.lock:
        book.promise(pod)
        merged = book.with_promises({})
        assert [(u.name, u.requests) for u in merged["gpu-a"]] == [("j-a1-0", {"nvidia.com/gpu": 2})]
        assert len(book.with_promises({"gpu-a": merged["gpu-a"]})["gpu-a"]) == 1
        assert not book.promised  # the index shows the pod: the promise lapsed


async def test_a_job_that_ended_before_any_launch_saw_its_pods_leaves_no_promise(cluster: Cluster) -> None:
    """A short job's pods may run and finish between two launches, so no launch ever sees them in the pod index:
    once its job sees them finished, their GPUs are free for the next job (not held until the promise's ttl)."""
    cluster.add_job("short", parallelism={"gpus": {"min": 3}})
    await cluster.create("short")
    for name in cluster.pods():
        cluster.set_pod(name, "Succeeded")
    await cluster.call(handlers.reconcile, "short")
    assert cluster.status("short")["phase"] == "Succeeded"

    cluster.add_job("next", parallelism={"gpus": {"min": 3}})
    await cluster.create("next")
    assert cluster.status("next")["phase"] == "Scheduling", cluster.status("next").get("conditions")
    assert {r["node"] for r in cluster.status("next")["plan"]["ranks"]} == {"gpu-a", "gpu-b"}


# --- suspend and resume -----------------------------------------------------------------------------------


def _suspend(cluster: Cluster, value: bool, generation: int) -> None:
    cluster.server.objects[JOB, NS, "cats"].patch({"metadata": {"generation": generation},
                                                   "spec": {"suspend": value}})


async def test_a_job_created_suspended_has_no_pods_until_resumed(cluster: Cluster) -> None:
    cluster.add_job(suspend=True)
    await cluster.create()
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Suspended" and cluster.pods() == {}
    suspended = cluster.condition("Suspended")
    assert (suspended["status"], suspended["message"]) == (
        "True", "spec.suspend is true: no worker pods until it is set false")
    _suspend(cluster, False, 2)
    await cluster.call(handlers.respec)
    status = cluster.status()
    assert status["phase"] == "Scheduling" and status["attempts"] == 1 and status.get("resumes", 0) == 0
    assert sorted(cluster.pods()) == ["cats-a1-0", "cats-a1-1"]
    assert cluster.condition("Suspended")["reason"] == "Resumed"


async def test_suspending_a_running_job_stops_its_pods_and_resuming_plans_a_new_attempt(cluster: Cluster) -> None:
    """Suspend while Running: the pods go, the phase says why, an event is posted; resume: the GPUs free now are
    planned again (here one node is gone) and a new attempt starts, which backoffLimit does not count."""
    cluster.add_job(backoffLimit=1)
    await cluster.create()
    for name in cluster.pods():
        cluster.set_pod(name, "Running")
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Running"

    _suspend(cluster, True, 2)
    await cluster.call(handlers.respec)
    assert cluster.status()["phase"] == "Suspended" and cluster.pods() == {}
    assert "attempt 1's worker pod(s) stopped; the images written so far are kept" in cluster.condition(
        "Suspended")["message"]
    assert "Suspended" in cluster.reasons()
    await cluster.call(handlers.reconcile)  # the timer leaves a suspended job alone
    assert cluster.status()["phase"] == "Suspended" and cluster.pods() == {}

    cluster.nodes = [gpu_node("gpu-b", 2)]
    _suspend(cluster, False, 3)
    await cluster.call(handlers.respec)
    status = cluster.status()
    assert (status["phase"], status["attempts"], status["resumes"]) == ("Scheduling", 2, 1)
    assert {r["node"] for r in status["plan"]["ranks"]} == {"gpu-b"}
    assert sorted(cluster.pods()) == ["cats-a2-0"]
    assert "Resumed" in cluster.reasons()
    # a pod failure of the resumed attempt is the job's first retry (backoffLimit 1): attempt 3, without the node
    cluster.nodes = [gpu_node("gpu-a", 1), gpu_node("gpu-b", 2)]
    cluster.set_pod("cats-a2-0", "Failed")
    await cluster.call(handlers.reconcile)
    status = cluster.status()
    assert (status["phase"], status["attempts"], status["excludedNodes"]) == ("Scheduling", 3, ["gpu-b"])
    cluster.set_pod("cats-a3-0", "Failed")  # the second retry is one too many
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Failed" and cluster.condition("Failed")["reason"] == "BackoffLimitExceeded"


async def test_the_timer_suspends_a_job_whose_update_event_was_missed(cluster: Cluster) -> None:
    cluster.add_job()
    await cluster.create()
    _suspend(cluster, True, 2)
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Suspended" and cluster.pods() == {}


async def test_a_job_on_gpus_published_through_dra_gets_claim_templates(cluster: Cluster) -> None:
    """A node whose two H200s only a ResourceSlice publishes: the job is planned there, its pod claims exactly the
    planned devices through a ResourceClaimTemplate (no extended resource), and a second job finds nothing free
    there while the first one's pod is planned on them."""
    dra = GPUNodeSpec("dra-a", "NVIDIA H200", 2, 143771, dra=True)
    cluster.nodes = [dra.manifest() | {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}]
    cluster.slices = [dra.resource_slice()]
    cluster.add_job(parallelism={"gpus": {"min": 2}})
    await cluster.create()
    status = cluster.status()
    assert status["phase"] == "Scheduling"
    assert {(r["node"], r["gpuIndex"], r["gpu"]) for r in status["plan"]["ranks"]} == {
        ("dra-a", 0, "NVIDIA H200"), ("dra-a", 1, "NVIDIA H200")}
    [template] = cluster.live("resource.k8s.io/v1/resourceclaimtemplates").values()
    [pod] = cluster.pods().values()
    claim = {"name": "gpus", "resourceClaimTemplateName": template["metadata"]["name"]}
    assert pod["spec"]["resourceClaims"] == [claim]
    assert pod["metadata"]["annotations"]["stadi.dev/gpu-indices"] == "0,1"
    cluster.add_job("dogs")
    await cluster.create("dogs")
    assert cluster.status("dogs")["phase"] == "Planning"
    assert cluster.condition("Planned", "dogs")["status"] == "False"


# --- Kueue --------------------------------------------------------------------------------------------------


def _queued(cluster: Cluster, **labels: str) -> None:
    cluster.runtime.kueue = True
    cluster.add_job(parallelism={"gpus": {"min": 3}})
    cluster.server.objects[JOB, NS, "cats"].patch(
        {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "gpus", **labels}}})


def _kueue_sets(cluster: Cluster, name: str, *conditions: tuple[str, str]) -> None:
    """What Kueue writes: the Workload's conditions."""
    cluster.server.objects[WORKLOADS, NS, name].patch({"status": {"conditions": [
        {"type": kind, "status": "True", "reason": reason, "message": f"{kind} by Kueue"}
        for kind, reason in conditions]}})


async def test_a_queued_job_waits_for_kueue_then_runs_and_hands_the_quota_back(cluster: Cluster) -> None:
    """Planned, the attempt's Workload says what its pods will request and no pod exists until Kueue admits it;
    admitted, the pods start; finished, the Workload is deleted (its quota goes back to the queue)."""
    _queued(cluster)
    await cluster.create()
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Queued" and cluster.pods() == {}
    assert cluster.status()["attempts"] == 1 and cluster.condition("Planned")["status"] == "True"
    admitted = cluster.condition("Admitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "Queued") and "queue gpus" in admitted["message"]
    [workload] = cluster.live(WORKLOADS).values()
    assert workload["metadata"]["name"] == "cats-a1" and workload["spec"]["queueName"] == "gpus"
    assert workload["metadata"]["ownerReferences"][0]["uid"] == "uid-cats"
    requests = sorted((ps["count"], ps["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"])
                      for ps in workload["spec"]["podSets"])
    assert requests == [(1, "1"), (1, "2")]  # the plan's two pods, 1 and 2 GPUs
    # the planned nodes' GPU product, for ResourceFlavors that are GPU products; not the planned hostname
    assert {tuple(ps["template"]["spec"]["nodeSelector"].items()) for ps in workload["spec"]["podSets"]} == {
        (("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),)}
    assert "Queued" in cluster.reasons() and "Planned" not in cluster.reasons()

    _kueue_sets(cluster, "cats-a1", ("QuotaReserved", "QuotaReserved"), ("Admitted", "Admitted"))
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Scheduling" and sorted(cluster.pods()) == ["cats-a1-0", "cats-a1-1"]
    assert cluster.condition("Admitted")["status"] == "True" and "Admitted" in cluster.reasons()
    for name in cluster.pods():
        cluster.set_pod(name, "Succeeded")
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Succeeded" and cluster.live(WORKLOADS) == {}
    assert cluster.phases() == ["Pending", "Planning", "Queued", "Scheduling", "Succeeded"]


async def test_an_evicted_job_stops_its_pods_and_queues_its_next_attempt(cluster: Cluster) -> None:
    """Kueue preempts the running attempt: its pods stop, its Workload goes, and attempt 2 queues with a
    Workload of its own; a resume, not a retry (backoffLimit 0 still allows it)."""
    _queued(cluster)
    cluster.server.objects[JOB, NS, "cats"].patch({"spec": {"backoffLimit": 0}})
    await cluster.create()
    _kueue_sets(cluster, "cats-a1", ("Admitted", "Admitted"))
    await cluster.call(handlers.reconcile)
    for name in cluster.pods():
        cluster.set_pod(name, "Running")
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Running"

    _kueue_sets(cluster, "cats-a1", ("Admitted", "Admitted"), ("Evicted", "Preempted"))
    await cluster.call(handlers.reconcile)
    status = cluster.status()
    assert (status["phase"], status["attempts"], status["resumes"]) == ("Queued", 2, 1)
    assert cluster.pods() == {} and list(cluster.live(WORKLOADS)) == ["cats-a2"]
    assert "Preempted" in cluster.condition("Scheduled")["message"]
    assert "Evicted" in cluster.reasons()
    _kueue_sets(cluster, "cats-a2", ("Admitted", "Admitted"))
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Scheduling" and sorted(cluster.pods()) == ["cats-a2-0", "cats-a2-1"]


async def test_suspending_a_queued_job_gives_its_place_up(cluster: Cluster) -> None:
    _queued(cluster)
    await cluster.create()
    _suspend(cluster, True, 2)
    await cluster.call(handlers.respec)
    assert cluster.status()["phase"] == "Suspended" and cluster.live(WORKLOADS) == {}
    _suspend(cluster, False, 3)
    await cluster.call(handlers.respec)
    assert cluster.status()["phase"] == "Queued" and list(cluster.live(WORKLOADS)) == ["cats-a2"]


async def test_a_priority_class_gives_the_workload_its_priority(cluster: Cluster) -> None:
    classes = "kueue.x-k8s.io/v1beta2/workloadpriorityclasses"
    cluster.server.resources[classes] = kmocklib.ResourceInfo(namespaced=False)
    cluster.server.objects[classes, None, "urgent"] = {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": "urgent"},
        "value": 1000}
    _queued(cluster, **{"kueue.x-k8s.io/priority-class": "urgent"})
    await cluster.create()
    spec = cluster.live(WORKLOADS)["cats-a1"]["spec"]
    assert spec["priority"] == 1000 and spec["priorityClassRef"] == {
        "group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass", "name": "urgent"}


@pytest.mark.parametrize(("kueue", "labels", "expected"), [
    (False, {}, "names queue 'gpus', but this cluster serves no Kueue Workloads"),
    (True, {"kueue.x-k8s.io/priority-class": "nope"},
     "metadata.labels[kueue.x-k8s.io/priority-class]: no WorkloadPriorityClass 'nope'"),
])
async def test_a_queue_the_cluster_cannot_give_fails_the_job_naming_the_label(
        cluster: Cluster, kueue: bool, labels: dict[str, str], expected: str) -> None:
    cluster.server.resources["kueue.x-k8s.io/v1beta2/workloadpriorityclasses"] = kmocklib.ResourceInfo(
        namespaced=False)
    _queued(cluster, **labels)
    cluster.runtime.kueue = kueue
    await cluster.create()
    assert cluster.status()["phase"] == "Failed" and cluster.pods() == {}
    failed = cluster.condition("Failed")
    assert failed["reason"] == "QueueUnavailable" and expected in failed["message"]


# --- metrics ------------------------------------------------------------------------------------------------


def _sample(cluster: Cluster, name: str, **labels: str) -> float | None:
    return cluster.runtime.metrics.registry.get_sample_value(name, labels or None)


async def test_metrics_follow_the_jobs(cluster: Cluster) -> None:
    """Jobs by phase, planning latency, time to running, re-plans and failures by reason, and the measured over
    the predicted seconds per image, from the handlers' own runs."""
    cluster.add_job()
    cluster.server.objects[JOB, NS, "cats"].patch({"metadata": {"creationTimestamp": "2025-01-01T11:59:00Z"}})
    await cluster.create()
    assert _sample(cluster, "stadi_jobs", phase="Scheduling") == 1
    assert _sample(cluster, "stadi_planning_seconds_count") == 1
    for name in cluster.pods():
        cluster.set_pod(name, "Running")
    await cluster.call(handlers.reconcile)
    assert _sample(cluster, "stadi_jobs", phase="Running") == 1 and _sample(cluster, "stadi_jobs",
                                                                           phase="Scheduling") == 0
    assert _sample(cluster, "stadi_job_time_to_running_seconds_sum") == 60.0  # created a minute before T0

    cluster.set_pod("cats-a1-1", "Failed")  # a retry without the node
    await cluster.call(handlers.reconcile)
    assert _sample(cluster, "stadi_replans_total", reason="PodFailed") == 1
    predicted = cluster.status()["plan"]["predictedSeconds"]
    steps = cluster.status()["plan"]["steps"]
    # what rank 0 reports: a median step 1.5 times the prediction's share
    cluster.server.objects[JOB, NS, "cats"].patch({"status": {"measured": [
        {"rank": 0, "medianMs": 1.5 * predicted * 1000 / steps, "stepMs": []}]}})
    for name in cluster.pods():
        if name.startswith("cats-a2"):
            cluster.set_pod(name, "Succeeded")
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Succeeded"
    single = cluster.status()["plan"]["alternatives"]["single"]
    assert cluster.status()["speedupText"] == f"{single / (1.5 * predicted):.2f}x"  # the -o wide column
    assert _sample(cluster, "stadi_measured_over_predicted_ratio_sum") == pytest.approx(1.5)
    assert _sample(cluster, "stadi_measured_over_predicted_ratio_bucket", le="1.5") == 1
    assert _sample(cluster, "stadi_measured_over_predicted_ratio_bucket", le="1.25") == 0

    cluster.add_job("bad", prompts=[])
    await cluster.create("bad")
    assert _sample(cluster, "stadi_job_failures_total", reason="InvalidSpec") == 1
    assert _sample(cluster, "stadi_jobs", phase="Failed") == 1
    await cluster.call(handlers.forget, "bad")
    assert _sample(cluster, "stadi_jobs", phase="Failed") == 0


# --- speeds that persist -------------------------------------------------------------------------------------


async def _finish(cluster: Cluster, name: str) -> None:
    for pod in cluster.pods():
        if pod.startswith(f"{name}-a1-"):
            cluster.set_pod(pod, "Succeeded")
    await cluster.call(handlers.reconcile, name)


async def _succeed_with_speeds(cluster: Cluster, name: str, speeds: list[float]) -> dict[str, Any]:
    await cluster.create(name)
    cluster.server.objects[JOB, NS, name].patch({"status": {"measured": [
        {"rank": rank, "speed": speed, "stepMs": []} for rank, speed in enumerate(speeds)]}})
    await _finish(cluster, name)
    assert cluster.status(name)["phase"] == "Succeeded"
    return cluster.status(name)


async def test_a_finished_jobs_speeds_plan_the_next_one_and_fade_with_age(cluster: Cluster) -> None:
    """The first job's measured speeds land in the GPUNodes (created where no agent made one); the next job of
    the same family, resolution and compile setting plans with them and says so; one of another resolution
    does not; half a half-life later a learned speed weighs half against the catalogue."""
    gpus3 = {"parallelism": {"gpus": {"min": 3}}}
    cluster.add_job("first", **gpus3)
    first = await _succeed_with_speeds(cluster, "first", [0.5, 0.25, 0.25])
    learned = {name: node["status"]["learned"] for name, node in cluster.live(GPUNODES).items()}
    by_rank = {(r["node"], r["gpuIndex"]): r["rank"] for r in first["plan"]["ranks"]}
    measured = {(node, e["index"]): e["speed"] for node, entries in learned.items() for e in entries}
    assert measured == {key: [0.5, 0.25, 0.25][rank] for key, rank in by_rank.items()}
    assert {(e["family"], e["resolution"], e["compiled"], e["job"]) for entries in learned.values()
            for e in entries} == {("sdxl", "1024x1024", False, f"{NS}/first")}

    cluster.add_job("second", **gpus3)
    await cluster.create("second")
    speeds = {(r["node"], r["gpuIndex"]): r["speed"] for r in cluster.status("second")["plan"]["ranks"]}
    assert speeds == pytest.approx(measured)
    assert any(reason == "LearnedSpeeds" and "first" not in message and "weight 1.00" in message
               for reason, message in cluster.events())

    await _finish(cluster, "second")

    cluster.add_job("other", height=512, width=512, **gpus3)
    await cluster.create("other")
    assert all(r["speed"] == 1.0 for r in cluster.status("other")["plan"]["ranks"])  # H100s, idle: catalogue
    await _finish(cluster, "other")

    cluster.now += timedelta(seconds=cluster.settings.learned_half_life)
    cluster.add_job("later", **gpus3)
    await cluster.create("later")
    later = {(r["node"], r["gpuIndex"]): r["speed"] for r in cluster.status("later")["plan"]["ranks"]}
    assert later == pytest.approx({key: 0.5 * speed + 0.5 * 1.0 for key, speed in measured.items()})
