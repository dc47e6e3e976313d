"""DiffusionJobs in a Kueue queue on the real control plane, Kueue and the operator running: a job over the
queue's GPU quota waits (phase Queued, no pods) and runs when the quota frees; a job of higher priority
preempts a running one, whose pods stop and whose next attempt queues again and runs to success; a queue whose
ResourceFlavors are GPU products charges the plan's GPUs to their product."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from test_chart import JOBS_NS, Stadi, stadi_fixture  # noqa: F401  (the session fixture "stadi")
from test_jobs import ROOT, WAIT, finish_pods, pods, printer_row, status, wait_phase, wait_pods_running
from test_kueue import API, queue_objects

pytestmark = pytest.mark.slow

BASE = yaml.safe_load((ROOT / "manifests" / "examples" / "sdxl-patch.yaml").read_text())


def queued_job(name: str, queue: str, priority: str | None = None) -> dict[str, Any]:
    """The sdxl-patch example on exactly 2 GPUs, in ``queue`` (Kueue's label), of a WorkloadPriorityClass."""
    manifest = copy.deepcopy(BASE)
    labels = {"kueue.x-k8s.io/queue-name": queue, **({"kueue.x-k8s.io/priority-class": priority} if priority else {})}
    manifest["metadata"] = {"name": name, "labels": labels}
    manifest["spec"]["parallelism"]["gpus"] = {"min": 2, "max": 2}
    return manifest


def workloads(stadi: Stadi, job: str) -> dict[str, dict[str, Any]]:
    items = stadi.cluster.kubectl_json("get", "workloads.kueue.x-k8s.io", "-n", JOBS_NS, "-l",
                                       f"stadi.dev/job={job}")["items"]
    return {w["metadata"]["name"]: w for w in items}


def condition(st: dict[str, Any], kind: str) -> dict[str, Any]:
    """Condition ``kind`` of a status (a job's, or a Workload's), {} when absent."""
    return next((c for c in st.get("conditions", []) if c["type"] == kind), {})


@pytest.fixture
def queue(stadi: Stadi, request: pytest.FixtureRequest) -> Iterator[str]:
    """A ClusterQueue of 2 GPUs (lower priorities preempted within it) and its LocalQueue in the jobs'
    namespace; the jobs of the test are deleted after it, then the queues."""
    name = request.node.name.split("[")[0].replace("_", "-")[-40:].strip("-")
    stadi.cluster.apply(queue_objects(f"cq-{name}", JOBS_NS, name, gpus=2,
                                      preemption={"withinClusterQueue": "LowerPriority"}))
    yield name
    stadi.kubectl("delete", "diffusionjobs", "-n", JOBS_NS, "-l", f"kueue.x-k8s.io/queue-name={name}",
                  "--wait=true", "--timeout=60s", check=False)
    stadi.kubectl("delete", "localqueue", name, "-n", JOBS_NS, "--wait=false", check=False)
    stadi.kubectl("delete", "clusterqueue", f"cq-{name}", "--wait=false", check=False)


def test_a_job_over_the_quota_waits_and_runs_when_it_frees(stadi: Stadi, queue: str) -> None:
    stadi.cluster.apply(queued_job("first", queue), "-n", JOBS_NS)
    wait_phase(stadi, "first", "Running")
    assert condition(status(stadi, "first"), "Admitted").get("status") == "True"
    [workload] = workloads(stadi, "first").values()
    assert condition(workload["status"], "Admitted").get("status") == "True"
    assert sum(int(ps["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]) * ps["count"]
               for ps in workload["spec"]["podSets"]) == 2

    stadi.cluster.apply(queued_job("second", queue), "-n", JOBS_NS)
    wait_phase(stadi, "second", "Queued")
    stadi.cluster.wait_for(lambda: condition(next(iter(workloads(stadi, "second").values()), {}).get("status", {}),
                                             "QuotaReserved").get("status") == "False",
                           WAIT, "Kueue evaluated the second Workload")
    st = status(stadi, "second")
    assert pods(stadi, "second") == [] and condition(st, "Admitted")["reason"] == "Queued"
    assert f"queue {queue}" in condition(st, "Admitted")["message"]
    assert printer_row(stadi, "second")["PHASE"] == "Queued"

    finish_pods(stadi, pods(stadi, "first", 1))
    wait_phase(stadi, "first", "Succeeded")
    stadi.cluster.wait_for(lambda: not workloads(stadi, "first"), WAIT, "the first job's Workload released")
    wait_phase(stadi, "second", "Running")
    finish_pods(stadi, pods(stadi, "second", 1))
    wait_phase(stadi, "second", "Succeeded")
    assert status(stadi, "second")["attempts"] == 1


def test_a_higher_priority_job_preempts_and_the_preempted_one_finishes_later(stadi: Stadi, queue: str) -> None:
    stadi.cluster.apply([{"apiVersion": API, "kind": "WorkloadPriorityClass", "metadata": {"name": name},
                          "value": value} for name, value in (("stadi-e2e-low", 100), ("stadi-e2e-high", 1000))])
    stadi.cluster.apply(queued_job("low", queue, "stadi-e2e-low"), "-n", JOBS_NS)
    wait_phase(stadi, "low", "Running")
    wait_pods_running(stadi, "low", 1, len(pods(stadi, "low", 1)))
    assert next(iter(workloads(stadi, "low").values()))["spec"]["priority"] == 100

    stadi.cluster.apply(queued_job("high", queue, "stadi-e2e-high"), "-n", JOBS_NS)
    wait_phase(stadi, "high", "Running")
    st = status(stadi, "low")
    assert st["phase"] == "Queued" and st["attempts"] == 2 and st["resumes"] == 1
    stadi.cluster.wait_for(lambda: not [p for p in pods(stadi, "low", 1)
                                        if not p["metadata"].get("deletionTimestamp")],
                           WAIT, "the preempted attempt's pods stopped")
    assert list(workloads(stadi, "low")) == ["low-a2"]
    assert "Evicted" in condition(st, "Scheduled")["reason"]

    finish_pods(stadi, pods(stadi, "high", 1))
    wait_phase(stadi, "high", "Succeeded")
    wait_phase(stadi, "low", "Running")
    finish_pods(stadi, pods(stadi, "low", 2))
    wait_phase(stadi, "low", "Succeeded")
    reasons = stadi.kubectl("get", "events", "-n", JOBS_NS, "--field-selector",
                            "involvedObject.name=low,involvedObject.kind=DiffusionJob",
                            "-o", "jsonpath={.items[*].reason}").stdout.split()
    assert {"Queued", "Admitted", "Evicted", "Succeeded"} <= set(reasons)


def test_gpu_products_as_resource_flavors(stadi: Stadi, request: pytest.FixtureRequest) -> None:
    """Flavors A100 (listed first, room for 8) and H100 (room for 2) by GFD's product label: a job planned on
    H100s is charged to the H100 flavor, where Kueue would otherwise take the first flavor that fits."""
    name = "flavored"
    flavors = [{"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": f"e2e-{gpu}"},
                "spec": {"nodeLabels": {"nvidia.com/gpu.product": product}}}
               for gpu, product in (("a100", "NVIDIA-A100-SXM4-80GB"), ("h100", "NVIDIA-H100-80GB-HBM3"))]
    stadi.cluster.apply([*flavors,
        {"apiVersion": API, "kind": "ClusterQueue", "metadata": {"name": f"cq-{name}"}, "spec": {
            "namespaceSelector": {}, "resourceGroups": [{"coveredResources": ["nvidia.com/gpu"], "flavors": [
                {"name": "e2e-a100", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 8}]},
                {"name": "e2e-h100", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 2}]}]}]}},
        {"apiVersion": API, "kind": "LocalQueue", "metadata": {"name": name, "namespace": JOBS_NS},
         "spec": {"clusterQueue": f"cq-{name}"}}])
    request.addfinalizer(lambda: [stadi.kubectl(*args, check=False) for args in (
        ("delete", "diffusionjob", name, "-n", JOBS_NS, "--wait=true", "--timeout=60s"),
        ("delete", "localqueue", name, "-n", JOBS_NS), ("delete", "clusterqueue", f"cq-{name}"))])
    manifest = queued_job(name, name)
    manifest["spec"]["template"] = {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    stadi.cluster.apply(manifest, "-n", JOBS_NS)
    wait_phase(stadi, name, "Running")
    [workload] = workloads(stadi, name).values()
    assignments = workload["status"]["admission"]["podSetAssignments"]
    assert {a["flavors"]["nvidia.com/gpu"] for a in assignments} == {"e2e-h100"}
    finish_pods(stadi, pods(stadi, name, 1))
    wait_phase(stadi, name, "Succeeded")
