"""DiffusionJobs on the real control plane: the examples of manifests/examples applied with kubectl, planned by
the operator (a local process with the chart's RBAC), their pods bound by kube-scheduler and run by kwok.

Each job: pods on nodes of the planned GPU products with the planned GPU counts and env; ``kubectl get dj``
shows Phase, Model, GPUs, Strategy, Progress and Predicted; Running → Succeeded on kwok's fake results. Then: a plan
across two GPU products, a failed pod re-planned without its node, a job suspended and resumed, GPUs published
through DRA planned and claimed, and deletion collecting every child.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from stadi_operator.devcluster import nodes as fake_nodes
from stadi_operator.devcluster.cluster import DevCluster
from test_chart import JOBS_NS, WORKER_IMAGE, Stadi, stadi_fixture  # noqa: F401  (the session fixture "stadi")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
WAIT = 60.0
FAKE_RESULT = "stadi.dev/fake-result"
LABEL_JOB = "stadi.dev/job"
LABEL_ATTEMPT = "stadi.dev/attempt"


# --- helpers ----------------------------------------------------------------------------------------------


def job(stadi: Stadi, name: str) -> dict[str, Any]:
    return dict(stadi.cluster.kubectl_json("get", "diffusionjob", name, "-n", JOBS_NS))


def status(stadi: Stadi, name: str) -> dict[str, Any]:
    return dict(job(stadi, name).get("status") or {})


def pods(stadi: Stadi, name: str, attempt: int | None = None) -> list[dict[str, Any]]:
    selector = f"{LABEL_JOB}={name}" + (f",{LABEL_ATTEMPT}={attempt}" if attempt is not None else "")
    items = stadi.cluster.kubectl_json("get", "pods", "-n", JOBS_NS, "-l", selector)["items"]
    return sorted(items, key=lambda p: p["metadata"]["name"])


def wait_phase(stadi: Stadi, name: str, phase: str, timeout: float = WAIT) -> dict[str, Any]:
    def reached() -> bool:
        stadi.assert_operator_alive()
        return status(stadi, name).get("phase") == phase

    try:
        stadi.cluster.wait_for(reached, timeout, f"DiffusionJob {name} phase {phase}")
    except TimeoutError as error:
        raise AssertionError(f"{error}; status: {json.dumps(status(stadi, name), indent=1)[:3000]}\n"
                             f"operator log:\n{stadi.operator_log_tail()}") from None
    return status(stadi, name)


def wait_pods_running(stadi: Stadi, name: str, attempt: int, count: int) -> list[dict[str, Any]]:
    def running() -> bool:
        found = pods(stadi, name, attempt)
        return len(found) == count and all(p["status"].get("phase") == "Running" for p in found)

    stadi.cluster.wait_for(running, WAIT, f"{count} Running pod(s) of {name} attempt {attempt}")
    return pods(stadi, name, attempt)


def finish_pods(stadi: Stadi, found: list[dict[str, Any]], result: str = "Succeeded") -> None:
    for pod in found:
        stadi.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", JOBS_NS, f"{FAKE_RESULT}={result}",
                      "--overwrite")


def delete_job(stadi: Stadi, name: str) -> None:
    stadi.kubectl("delete", "diffusionjob", name, "-n", JOBS_NS, "--ignore-not-found", "--wait=true",
                  "--timeout=60s")


def node_labels(stadi: Stadi, node: str) -> dict[str, str]:
    return dict(stadi.cluster.kubectl_json("get", "node", node)["metadata"]["labels"])


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def printer_row(stadi: Stadi, name: str) -> dict[str, str]:
    """``kubectl get dj NAME`` parsed by the header's column offsets (values may hold spaces)."""
    header, row = stadi.kubectl("get", "dj", name, "-n", JOBS_NS).stdout.splitlines()[:2]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    bounds = [*starts[1:], None]
    return {col: row[start:end].strip() for col, start, end in zip(names, starts, bounds, strict=True)}


def worker_patch(stadi: Stadi, name: str, status_patch: dict[str, Any]) -> None:
    """What rank 0 does: one JSON merge patch of the job's status subresource with a token of the job's worker
    ServiceAccount (TokenRequest), nothing read first; raises on any refusal."""
    token = stadi.cluster.token(f"{name}-worker", JOBS_NS, duration="10m")
    url = f"{stadi.cluster.server}/apis/stadi.dev/v1alpha1/namespaces/{JOBS_NS}/diffusionjobs/{name}/status"
    request = urllib.request.Request(url, data=json.dumps({"status": status_patch}).encode(), method="PATCH",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/merge-patch+json"})
    context = ssl.create_default_context(cafile=str(stadi.cluster.ca_file))
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        assert response.status == 200


def check_pods_follow_plan(stadi: Stadi, name: str, attempt: int) -> list[dict[str, Any]]:
    """The attempt's pods: one per planned node, bound there by the scheduler, with that node's planned GPUs,
    a product matching the plan, and the env and torchrun arguments of their slot."""
    st = status(stadi, name)
    plan = st["plan"]
    by_node: dict[str, list[dict[str, Any]]] = {}
    for rank in sorted(plan["ranks"], key=lambda r: r["rank"]):
        by_node.setdefault(rank["node"], []).append(rank)
    found = wait_pods_running(stadi, name, attempt, len(by_node))
    assert st["gpus"] == len(plan["ranks"])
    assert sum(len(r) for r in by_node.values()) == st["gpus"]
    seen_nodes = set()
    for pod in found:
        node = pod["spec"]["nodeName"]  # bound by kube-scheduler (the pod only carries a hostname selector)
        seen_nodes.add(node)
        assert node in by_node, f"pod {pod['metadata']['name']} on {node}, plan uses {sorted(by_node)}"
        ranks = by_node[node]
        product = node_labels(stadi, node)["nvidia.com/gpu.product"]
        assert {rank["gpu"] for rank in ranks} == {product}
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(len(ranks))
        assert container["resources"]["requests"]["nvidia.com/gpu"] == str(len(ranks))
        # The job names no image, so the operator's worker image setting applies.
        assert container["image"] == WORKER_IMAGE
        index = int(pod["metadata"]["labels"]["stadi.dev/pod-index"])
        env = env_of(pod)
        assert env["STADI_JOB_NAME"] == name
        assert env["STADI_JOB_NAMESPACE"] == JOBS_NS
        assert env["STADI_ATTEMPT"] == str(attempt)
        assert env["STADI_POD_INDEX"] == str(index)
        command = container["command"]
        assert command[0] == "torchrun"
        assert f"--nproc-per-node={len(ranks)}" in command
        assert f"--nnodes={len(by_node)}" in command
        assert f"--node-rank={index}" in command
        assert f"--master-addr={name}-a{attempt}-0.{name}.{JOBS_NS}.svc" in command
        # Ranks are consecutive per pod and pod 0 holds rank 0.
        if index == 0:
            assert 0 in [r["rank"] for r in ranks]
        events = stadi.kubectl("get", "events", "-n", JOBS_NS, "--field-selector",
                               f"involvedObject.name={pod['metadata']['name']}",
                               "-o", "jsonpath={.items[*].reason}").stdout.split()
        assert "Scheduled" in events
    assert seen_nodes == set(by_node)
    return found


@pytest.fixture
def cleanup(stadi: Stadi) -> Iterator[list[str]]:
    """Names of jobs (and pods) to delete after the test, also when it fails."""
    names: list[str] = []
    yield names
    for name in names:
        stadi.kubectl("delete", "diffusionjob,pod", name, "-n", JOBS_NS, "--ignore-not-found", "--wait=false",
                      check=False)


# --- tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_job_runs_to_success(stadi: Stadi, example: Path, cleanup: list[str]) -> None:
    manifest = yaml.safe_load(example.read_text())
    name = manifest["metadata"]["name"]
    cleanup.append(name)
    stadi.kubectl("apply", "-n", JOBS_NS, "-f", str(example))

    st = wait_phase(stadi, name, "Running")
    assert st["attempts"] == 1
    assert st["plan"]["predictedSeconds"] > 0
    conditions = {c["type"]: c for c in st["conditions"]}
    assert conditions["Valid"]["status"] == "True"
    assert conditions["Planned"]["status"] == "True"
    assert conditions["Scheduled"]["status"] == "True"
    found = check_pods_follow_plan(stadi, name, 1)

    # Rank 0 reports progress through the job's own ServiceAccount (the Role the operator created).
    total = len(manifest["spec"].get("prompts") or [])
    worker_patch(stadi, name, {"progress": {"step": 3, "steps": manifest["spec"].get("steps", 50),
                                            "imagesDone": 1, "imagesTotal": total}})
    stadi.cluster.wait_for(lambda: status(stadi, name).get("progressText") == f"1/{total} images", WAIT,
                           "progressText from the operator")

    row = printer_row(stadi, name)
    assert row["NAME"] == name
    assert row["PHASE"] == "Running"
    assert row["MODEL"] == manifest["spec"]["model"]["family"]
    assert row["GPUS"] == str(len(st["plan"]["ranks"]))
    assert row["STRATEGY"] == st["plan"]["strategy"] == st["strategy"]
    assert row["PROGRESS"] == f"1/{total} images"
    assert row["PREDICTED"] == f"{st['plan']['predictedSeconds']:.2f}s"  # seconds that read well
    assert row["AGE"]
    wide = stadi.kubectl("get", "dj", name, "-n", JOBS_NS, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-2:] == ["NODES", "SPEEDUP"] and all(r["node"] in wide[1] for r in st["plan"]["ranks"])

    finish_pods(stadi, found)
    st = wait_phase(stadi, name, "Succeeded")
    conditions = {c["type"]: c for c in st["conditions"]}
    assert conditions["Complete"]["status"] == "True"
    assert st["completionTime"]
    assert st["outputs"]
    assert printer_row(stadi, name)["PHASE"] == "Succeeded"
    reasons = stadi.kubectl("get", "events", "-n", JOBS_NS, "--field-selector",
                            f"involvedObject.name={name},involvedObject.kind=DiffusionJob",
                            "-o", "jsonpath={.items[*].reason}").stdout.split()
    assert {"Planned", "Scheduled", "Succeeded"} <= set(reasons)
    delete_job(stadi, name)


def _blocker(node: str, count: int) -> dict[str, Any]:
    """A plain pod holding ``count`` GPUs of ``node`` (in the watched namespace, so the inventory sees it)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"blocker-{node}", "namespace": JOBS_NS},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [{"name": "hold", "image": "example.invalid/hold:1",
                            "resources": {"limits": {"nvidia.com/gpu": str(count)}},
                            # the namespace enforces Pod Security "restricted" (test_chart.helm_install)
                            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                                "runAsNonRoot": True, "runAsUser": 1000,
                                                "seccompProfile": {"type": "RuntimeDefault"}}}],
        },
    }


def test_plan_across_gpu_products(stadi: Stadi, cleanup: list[str]) -> None:
    """With the H100s taken, an 8-GPU stadi job spans the A100 and the L4 node: two pods, two products,
    elastic rows with the slower L4 ranks on longer strides."""
    blockers = [_blocker(node, 8) for node in ("gpu-h100-0", "gpu-h100-1")]
    cleanup.extend(b["metadata"]["name"] for b in blockers)
    stadi.cluster.apply(blockers)
    stadi.cluster.wait_for(lambda: all(
        stadi.kubectl("get", "pod", b["metadata"]["name"], "-n", JOBS_NS, "-o", "jsonpath={.status.phase}"
                      ).stdout == "Running" for b in blockers), WAIT, "blocker pods Running")
    manifest = yaml.safe_load((ROOT / "manifests" / "examples" / "sdxl.yaml").read_text())
    manifest["metadata"]["name"] = "mixed"
    manifest["spec"]["parallelism"] = {"strategy": "stadi", "gpus": {"min": 6, "max": 8}}
    cleanup.append("mixed")
    stadi.cluster.apply(manifest, "-n", JOBS_NS)
    st = wait_phase(stadi, "mixed", "Running")
    found = check_pods_follow_plan(stadi, "mixed", 1)
    products = {node_labels(stadi, p["spec"]["nodeName"])["nvidia.com/gpu.product"] for p in found}
    assert len(found) == 2 and len(products) == 2, products
    assert not {p["spec"]["nodeName"] for p in found} & {"gpu-h100-0", "gpu-h100-1"}
    strides = {r["node"]: r["stride"] for r in st["plan"]["ranks"]}
    assert len(set(strides.values())) == 2  # temporal quantization: the slower product skips steps
    finish_pods(stadi, found)
    wait_phase(stadi, "mixed", "Succeeded")
    names = [b["metadata"]["name"] for b in blockers]
    stadi.kubectl("delete", "pod", *names, "-n", JOBS_NS, "--wait=false")
    stadi.cluster.wait_for(lambda: stadi.kubectl("get", "pod", *names, "-n", JOBS_NS, "--ignore-not-found",
                                                 "-o", "name").stdout.strip() == "", 120, "blocker pods gone")
    delete_job(stadi, "mixed")


def test_failed_pod_replans_without_its_node(stadi: Stadi, cleanup: list[str]) -> None:
    manifest = yaml.safe_load((ROOT / "manifests" / "examples" / "sdxl-patch.yaml").read_text())
    manifest["metadata"]["name"] = "replan"
    cleanup.append("replan")
    stadi.cluster.apply(manifest, "-n", JOBS_NS)
    wait_phase(stadi, "replan", "Running")
    first = check_pods_follow_plan(stadi, "replan", 1)
    failed_node = first[0]["spec"]["nodeName"]
    finish_pods(stadi, first[:1], "Failed")

    def replanned() -> bool:
        st = status(stadi, "replan")
        return st.get("attempts") == 2 and st.get("phase") == "Running"

    try:
        stadi.cluster.wait_for(replanned, WAIT, "attempt 2 Running")
    except TimeoutError as error:
        raise AssertionError(f"{error}: {json.dumps(status(stadi, 'replan'))[:3000]}\n"
                             f"{stadi.operator_log_tail()}") from None
    st = status(stadi, "replan")
    assert st["excludedNodes"] == [failed_node]
    assert failed_node not in {r["node"] for r in st["plan"]["ranks"]}
    second = check_pods_follow_plan(stadi, "replan", 2)
    assert failed_node not in {p["spec"]["nodeName"] for p in second}
    planned = {c["type"]: c for c in st["conditions"]}["Planned"]
    assert planned["reason"] == "Replanned"
    # The failed attempt's pods: the failed one is kept for its logs, the others were stopped.
    old = pods(stadi, "replan", 1)
    assert [p["status"].get("phase") for p in old if p["metadata"]["name"] == first[0]["metadata"]["name"]] \
        == ["Failed"]
    reasons = stadi.kubectl("get", "events", "-n", JOBS_NS, "--field-selector",
                            "involvedObject.name=replan,involvedObject.kind=DiffusionJob",
                            "-o", "jsonpath={.items[*].reason}").stdout.split()
    assert {"PodFailed", "Replanned"} <= set(reasons)
    finish_pods(stadi, second)
    wait_phase(stadi, "replan", "Succeeded")
    delete_job(stadi, "replan")


def test_suspend_stops_the_pods_and_resume_plans_a_new_attempt(stadi: Stadi, cleanup: list[str]) -> None:
    """spec.suspend on a running job (kubectl patch, as a user or Kueue would): its pods are deleted and the phase
    and condition say why; set false, the job is planned again and runs a new attempt to success."""
    manifest = yaml.safe_load((ROOT / "manifests" / "examples" / "sdxl-patch.yaml").read_text())
    manifest["metadata"]["name"] = "pause"
    cleanup.append("pause")
    stadi.cluster.apply(manifest, "-n", JOBS_NS)
    wait_phase(stadi, "pause", "Running")
    check_pods_follow_plan(stadi, "pause", 1)

    def suspend(value: bool) -> None:
        stadi.kubectl("patch", "diffusionjob", "pause", "-n", JOBS_NS, "--type", "merge", "-p",
                      json.dumps({"spec": {"suspend": value}}))

    suspend(True)
    wait_phase(stadi, "pause", "Suspended")
    stadi.cluster.wait_for(lambda: not pods(stadi, "pause"), WAIT, "the suspended job's pods deleted")
    st = status(stadi, "pause")
    suspended = {c["type"]: c for c in st["conditions"]}["Suspended"]
    assert suspended["status"] == "True" and "worker pod(s) stopped" in suspended["message"]
    assert printer_row(stadi, "pause")["PHASE"] == "Suspended"

    suspend(False)
    stadi.cluster.wait_for(lambda: status(stadi, "pause").get("attempts") == 2, WAIT, "attempt 2 planned")
    wait_phase(stadi, "pause", "Running")
    st = status(stadi, "pause")
    assert st["resumes"] == 1 and {c["type"]: c for c in st["conditions"]}["Suspended"]["status"] == "False"
    finish_pods(stadi, check_pods_follow_plan(stadi, "pause", 2))
    wait_phase(stadi, "pause", "Succeeded")
    reasons = stadi.kubectl("get", "events", "-n", JOBS_NS, "--field-selector",
                            "involvedObject.name=pause,involvedObject.kind=DiffusionJob",
                            "-o", "jsonpath={.items[*].reason}").stdout.split()
    assert {"Suspended", "Resumed", "Succeeded"} <= set(reasons)
    delete_job(stadi, "pause")


# Two nodes whose GPUs only DRA publishes (no device plugin, no GFD labels), tainted so that no other test's job
# lands there; the DRA jobs tolerate the taint and select the label.
DRA_LABEL = ("stadi.dev/e2e-dra", "true")
DRA_NODES = [fake_nodes.GPUNodeSpec(name, product, gpus, memory, dra=True, labels=(DRA_LABEL,),
                                    taints=((*DRA_LABEL, "NoSchedule"),))
             for name, product, gpus, memory in (("dra-h200-0", "NVIDIA H200", 2, 143771),
                                                 ("dra-h200-1", "NVIDIA H200", 1, 143771),
                                                 ("dra-a100-0", "NVIDIA A100-SXM4-80GB", 1, 81920))]


@pytest.fixture
def dra_fleet(stadi: Stadi) -> Iterator[list[str]]:
    """The DeviceClass, the DRA nodes and their ResourceSlices (as NVIDIA's driver would publish them)."""
    stadi.cluster.apply(fake_nodes.dra_objects(DRA_NODES))
    names = [n.name for n in DRA_NODES]
    stadi.cluster.wait_for(lambda: all(
        any(c["type"] == "Ready" and c["status"] == "True"
            for c in stadi.cluster.kubectl_json("get", "node", n)["status"].get("conditions", []))
        for n in names), WAIT, "DRA nodes Ready")
    yield names
    stadi.kubectl("delete", "resourceslices", *[f"{n}-{fake_nodes.DRA_DRIVER}" for n in names],
                  "--ignore-not-found", "--wait=false", check=False)
    stadi.kubectl("delete", "nodes", *names, "--ignore-not-found", "--wait=false", check=False)


def dra_job(name: str, gpus: int) -> dict[str, Any]:
    manifest = yaml.safe_load((ROOT / "manifests" / "examples" / "sdxl-patch.yaml").read_text())
    manifest["metadata"]["name"] = name
    spec = manifest["spec"]
    spec["parallelism"] = {**spec.get("parallelism", {}), "strategy": "auto", "gpus": {"min": gpus, "max": gpus}}
    spec["template"] = {"nodeSelector": dict([DRA_LABEL]),
                        "tolerations": [{"key": DRA_LABEL[0], "operator": "Exists", "effect": "NoSchedule"}]}
    return manifest


def test_gpus_published_through_dra_are_planned_and_claimed(stadi: Stadi, dra_fleet: list[str],
                                                              cleanup: list[str]) -> None:
    """Three H200s and an A100 that only ResourceSlices publish: a job of three GPUs is planned on the H200s, each
    pod names a claim template of exactly its planned devices, the real scheduler allocates those devices and binds
    the pods; a job of one GPU gets the A100 (its product read from its slice); a job asking for more GPUs than are
    published and free waits with Planned=False saying why, and no pod."""
    cleanup += ["dra", "dra-more", "dra-one"]
    stadi.cluster.apply(dra_job("dra", 3), "-n", JOBS_NS)
    wait_phase(stadi, "dra", "Running")
    st = status(stadi, "dra")
    planned = {(r["node"], r["gpuIndex"]) for r in st["plan"]["ranks"]}
    assert planned == {("dra-h200-0", 0), ("dra-h200-0", 1), ("dra-h200-1", 0)}
    assert {r["gpu"] for r in st["plan"]["ranks"]} == {"NVIDIA H200"}
    found = pods(stadi, "dra", 1)
    claims = {c["metadata"]["name"]: c for c in
              stadi.cluster.kubectl_json("get", "resourceclaims", "-n", JOBS_NS)["items"]}
    for pod in found:
        node = pod["spec"]["nodeName"]
        assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"].get("limits", {})
        [ref] = pod["status"]["resourceClaimStatuses"]
        results = claims[ref["resourceClaimName"]]["status"]["allocation"]["devices"]["results"]
        assert {(r["driver"], r["pool"], r["device"]) for r in results} == {
            (fake_nodes.DRA_DRIVER, node, f"gpu-{i}") for n, i in planned if n == node}

    stadi.cluster.apply(dra_job("dra-one", 1), "-n", JOBS_NS)
    wait_phase(stadi, "dra-one", "Running")
    [rank] = status(stadi, "dra-one")["plan"]["ranks"]
    assert (rank["node"], rank["gpuIndex"], rank["gpu"]) == ("dra-a100-0", 0, "NVIDIA A100-SXM4-80GB")
    stadi.cluster.apply(dra_job("dra-more", 2), "-n", JOBS_NS)

    def waiting() -> bool:
        conditions = {c["type"]: c for c in status(stadi, "dra-more").get("conditions", [])}
        return conditions.get("Planned", {}).get("status") == "False"

    stadi.cluster.wait_for(waiting, WAIT, "dra-more waiting for GPUs")
    more = status(stadi, "dra-more")
    message = {c["type"]: c for c in more["conditions"]}["Planned"]["message"]
    assert more["phase"] == "Planning" and "no plan for attempt 1" in message, message
    assert pods(stadi, "dra-more") == []
    finish_pods(stadi, [*found, *pods(stadi, "dra-one", 1)])
    wait_phase(stadi, "dra", "Succeeded")
    wait_phase(stadi, "dra-one", "Succeeded")
    for name in ("dra", "dra-one", "dra-more"):
        delete_job(stadi, name)


CHILD_KINDS = ("pods,configmaps,services,serviceaccounts,networkpolicies.networking.k8s.io,"
               "roles.rbac.authorization.k8s.io,rolebindings.rbac.authorization.k8s.io")


def _children(stadi: Stadi, name: str) -> list[str]:
    out = stadi.kubectl("get", CHILD_KINDS, "-n", JOBS_NS, "-l", f"{LABEL_JOB}={name}", "-o", "name").stdout
    return sorted(out.split())


def test_delete_job_garbage_collects_children(stadi: Stadi, dev_cluster: DevCluster,
                                              cleanup: list[str]) -> None:
    manifest = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-sdxl.yaml").read_text())
    manifest["metadata"]["name"] = "doomed"
    cleanup.append("doomed")
    stadi.cluster.apply(manifest, "-n", JOBS_NS)
    wait_phase(stadi, "doomed", "Running")
    children = _children(stadi, "doomed")
    kinds = {c.split("/")[0] for c in children}
    assert {"pod", "configmap", "service", "serviceaccount", "role.rbac.authorization.k8s.io",
            "rolebinding.rbac.authorization.k8s.io", "networkpolicy.networking.k8s.io"} <= kinds, children
    uid = job(stadi, "doomed")["metadata"]["uid"]
    for child in children:
        refs = stadi.cluster.kubectl_json("get", child, "-n", JOBS_NS)["metadata"]["ownerReferences"]
        assert [r["uid"] for r in refs if r.get("controller")] == [uid], child
    # Background deletion: the job goes at once, the controller-manager's garbage collector takes the rest.
    stadi.kubectl("delete", "diffusionjob", "doomed", "-n", JOBS_NS, "--cascade=background", "--wait=true",
                  "--timeout=30s")
    dev_cluster.wait_for(lambda: _children(stadi, "doomed") == [], WAIT, "children garbage-collected")
    assert stadi.kubectl("get", "dj", "doomed", "-n", JOBS_NS, check=False).returncode != 0


def test_operator_never_refused(stadi: Stadi, cleanup: list[str]) -> None:
    """The operator drives a job of its own through every kind of call it makes (children, events, status, pod
    deletion, the TTL's delete of the job) and is never refused: the chart's RBAC covers what it does. Run after
    the tests above, the log also covers theirs."""
    manifest = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-sdxl.yaml").read_text())
    manifest["metadata"]["name"] = "rbac-probe"
    manifest["spec"]["ttlSecondsAfterFinished"] = 1
    cleanup.append("rbac-probe")
    stadi.cluster.apply(manifest, "-n", JOBS_NS)
    wait_phase(stadi, "rbac-probe", "Running")
    finish_pods(stadi, pods(stadi, "rbac-probe", 1))
    wait_phase(stadi, "rbac-probe", "Succeeded")
    stadi.cluster.wait_for(
        lambda: stadi.kubectl("get", "dj", "rbac-probe", "-n", JOBS_NS, check=False).returncode != 0, WAIT,
        "the operator deleting rbac-probe after its ttlSecondsAfterFinished")

    stadi.assert_operator_alive()
    assert not stadi.forbidden_in_operator_log(), "\n".join(stadi.forbidden_in_operator_log()[:20])
