"""The real kopf loop against kmock: registration, indexes, the create cycle and the timer, end to end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kmock as kmocklib
import kopf
import pytest
from stadi_operator.controller import handlers
from stadi_operator.controller.runtime import Runtime
from stadi_operator.kube import Kube
from stadi_operator.settings import OperatorSettings

pytestmark = pytest.mark.asyncio

NS = "team-a"
JOB = "stadi.dev/v1alpha1/diffusionjobs"
VERBS = {"list", "watch", "get", "patch", "create", "delete"}


async def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_kopf_runs_a_job_from_create_to_succeeded(kmock: kmocklib.KubernetesEmulator) -> None:
    server = kmock
    for res, kind, namespaced in (
        (JOB, "DiffusionJob", True), ("stadi.dev/v1alpha1/gpunodes", "GPUNode", False),
        ("v1/nodes", "Node", False), ("v1/namespaces", "Namespace", False), ("v1/pods", "Pod", True),
        ("v1/configmaps", "ConfigMap", True),
        ("v1/services", "Service", True), ("v1/serviceaccounts", "ServiceAccount", True),
        ("v1/events", "Event", True), ("rbac.authorization.k8s.io/v1/roles", "Role", True),
        ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", True),
    ):
        server.resources[res] = kmocklib.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS,
                                                      subresources={"status"} if res == JOB else set())
    server.objects["v1/nodes", None, "gpu-a"] = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "gpu-a", "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
        "status": {"allocatable": {"nvidia.com/gpu": "2"}, "conditions": [{"type": "Ready", "status": "True"}]},
    }
    server.objects[JOB, NS, "cats"] = {
        "apiVersion": "stadi.dev/v1alpha1", "kind": "DiffusionJob",
        "metadata": {"name": "cats", "namespace": NS, "uid": "uid-cats", "generation": 1, "resourceVersion": "1"},
        "spec": {"model": {"family": "sdxl", "source": "random://tiny"}, "prompts": ["a cat"],
                 "output": {"uri": "s3://bucket/cats"}},
    }
    url = str(server.url).rstrip("/")
    settings = OperatorSettings(reconcile_interval=0.2, watch_server_timeout=5, watch_client_timeout=6)
    runtime = Runtime(settings, Kube.for_host(url, timeout=5), clock=lambda: datetime.now(UTC))

    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True)

    registry = handlers.register(kopf.OperatorRegistry(), settings, login=login)
    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=registry, clusterwide=True, standalone=True, stop_flag=stop,
        memo=kopf.Memo(runtime=runtime, options=settings),
    ))
    try:
        pods = (kmocklib.resource("v1/pods"), NS, "cats-a1-0")
        await eventually(lambda: pods in server.objects and not server.objects[pods].deleted)
        job = server.objects[JOB, NS, "cats"]
        await eventually(lambda: job.get("status", {}).get("phase") == "Scheduling")
        server.objects[pods].patch({"spec": {"nodeName": "gpu-a"}, "status": {"phase": "Succeeded"}})
        await eventually(lambda: job.get("status", {}).get("phase") == "Succeeded")
        phases = [v["status"]["phase"] for v in job.history if v is not None and "phase" in v.get("status", {})]
        assert phases[0] == "Planning" and phases[-1] == "Succeeded" and "Scheduling" in phases
        assert sum(1 for r in server if r.method == "POST" and r.resource == kmocklib.resource("v1/pods")) == 1
        # kopf's bookkeeping lives in annotations, not in the schema-bound status.
        assert "kopf" not in job["status"]
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
