"""The pod-group builder: exact manifests for a 2-node plan (pure, no API)."""

from __future__ import annotations

import json

import pytest
from stadi_operator.controller import children as ch

from stadi.api import DiffusionJobSpec, Plan, RankPlan, load_job

OWNER = ch.Owner("cats", "team-a", "uid-1")
REF = {"apiVersion": "stadi.dev/v1alpha1", "kind": "DiffusionJob", "name": "cats", "uid": "uid-1",
       "controller": True, "blockOwnerDeletion": True}


def make_spec(**extra: object) -> DiffusionJobSpec:
    return DiffusionJobSpec.model_validate({
        "model": {"family": "sdxl", "source": "random://tiny"},
        "prompts": ["a cat", "a dog"],
        "output": {"uri": "s3://bucket/out", "credentialsSecret": "s3-creds", "endpoint": "http://minio:9000"},
        "template": {"nodeSelector": {"pool": "gpu"},
                     "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     "resources": {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "32Gi"}}},
        **extra,
    })


def make_plan() -> Plan:
    """Rank 0 on gpu-a, ranks 1-2 on gpu-b (the planner numbers a node's GPUs consecutively)."""
    ranks = [RankPlan(rank=0, gpu="H100", node="gpu-a", gpu_index=0, speed=1.0, rows=(0, 44)),
             RankPlan(rank=1, gpu="H100", node="gpu-b", gpu_index=0, speed=1.0, rows=(44, 88)),
             RankPlan(rank=2, gpu="H100", node="gpu-b", gpu_index=1, speed=1.0, rows=(88, 128))]
    return Plan(strategy="patch", family="sdxl", latent_height=128, latent_width=128, granularity=4, steps=50,
                guidance=True, ranks=ranks, predicted_seconds=3.0)


def build(attempt: int = 2, **options: object) -> dict[str, list[dict]]:
    objs = ch.children(OWNER, make_spec(), make_plan(), attempt, ch.WorkerOptions(**options))
    by_kind: dict[str, list[dict]] = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], []).append(obj)
    return by_kind


def test_pods_follow_the_plan_node_by_node() -> None:
    pods = build()["Pod"]
    assert [p["metadata"]["name"] for p in pods] == ["cats-a2-0", "cats-a2-1"]
    a, b = (p["spec"] for p in pods)
    assert a["nodeSelector"] == {"pool": "gpu", "kubernetes.io/hostname": "gpu-a"}
    assert b["nodeSelector"] == {"pool": "gpu", "kubernetes.io/hostname": "gpu-b"}
    assert a["containers"][0]["resources"] == {"requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
                                               "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}}
    assert b["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert a["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert a["restartPolicy"] == "Never"
    assert a["serviceAccountName"] == "cats-worker"
    assert a["containers"][0]["image"] == ch.DEFAULT_WORKER_IMAGE == "ghcr.io/stadi-dev/stadi-worker:0.1.0"


def test_torchrun_command_rendezvous_on_rank0_dns() -> None:
    pods = build()["Pod"]
    assert pods[1]["spec"]["containers"][0]["command"] == [
        "torchrun", "--nnodes=2", "--nproc-per-node=2", "--node-rank=1",
        "--master-addr=cats-a2-0.cats.team-a.svc", "--master-port=29500", "--no-python",
        "stadi", "worker", "--plan", "/etc/stadi/plan.json", "--job", "/etc/stadi/job.json",
    ]
    rank0 = pods[0]["spec"]
    # hostname.subdomain under the headless Service named like the job: the DNS name above.
    assert (rank0["hostname"], rank0["subdomain"]) == ("cats-a2-0", "cats")
    assert ch.rank0_address("cats", "team-a", 2) == "cats-a2-0.cats.team-a.svc"


def test_env_credentials_and_no_cuda_visible_devices() -> None:
    env = build()["Pod"][0]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    assert by_name["STADI_JOB_NAME"]["value"] == "cats"
    assert by_name["STADI_JOB_NAMESPACE"]["value"] == "team-a"
    assert by_name["STADI_ATTEMPT"]["value"] == "2"
    assert by_name["STADI_OUTPUT"]["value"] == "s3://bucket/out"
    assert by_name["STADI_ENDPOINT"]["value"] == "http://minio:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert by_name[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": key}}
    assert "CUDA_VISIBLE_DEVICES" not in by_name


def test_config_map_volume_labels_security_and_owner() -> None:
    pod = build()["Pod"][1]
    spec = pod["spec"]
    assert {"name": "stadi", "configMap": {"name": "cats-plan"}} in spec["volumes"]
    mounts = spec["containers"][0]["volumeMounts"]
    assert {"name": "stadi", "mountPath": "/etc/stadi", "readOnly": True} in mounts
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "stadi-worker", "app.kubernetes.io/managed-by": "stadi-operator",
        "stadi.dev/job": "cats", "stadi.dev/attempt": "2", "stadi.dev/pod-index": "1",
    }
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False,
                                                        "capabilities": {"drop": ["ALL"]}}
    assert "schedulerName" not in spec


def test_every_child_is_controlled_by_the_job() -> None:
    objs = ch.children(OWNER, make_spec(), make_plan(), 1, ch.WorkerOptions(volcano=True))
    assert [o["kind"] for o in objs] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service",
                                         "PodGroup", "Pod", "Pod"]
    for obj in objs:
        assert obj["metadata"]["ownerReferences"] == [REF], obj["kind"]
        assert obj["metadata"]["namespace"] == "team-a"


def test_rbac_allows_only_patching_this_jobs_status() -> None:
    kinds = build()
    assert kinds["Role"][0]["rules"] == [{"apiGroups": ["stadi.dev"], "resources": ["diffusionjobs/status"],
                                          "resourceNames": ["cats"], "verbs": ["patch"]}]
    binding = kinds["RoleBinding"][0]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cats-worker"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cats-worker", "namespace": "team-a"}]
    assert kinds["ServiceAccount"][0]["metadata"]["name"] == "cats-worker"


def test_headless_service_selects_the_attempt() -> None:
    svc = build()["Service"][0]
    assert svc["metadata"]["name"] == "cats"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"stadi.dev/job": "cats", "stadi.dev/attempt": "2"}
    assert svc["spec"]["ports"][0]["port"] == 29500


def test_config_map_holds_the_plan_and_a_loadable_job() -> None:
    cm = build()["ConfigMap"][0]
    assert cm["metadata"]["name"] == "cats-plan"
    assert cm["metadata"]["annotations"] == {"stadi.dev/attempt": "2"}
    assert Plan.model_validate_json(cm["data"]["plan.json"]) == make_plan()
    job = load_job(json.loads(cm["data"]["job.json"]))
    assert job.metadata.name == "cats" and job.spec == make_spec()


def test_volcano_gang() -> None:
    kinds = build(volcano=True)
    assert kinds["PodGroup"][0]["metadata"]["name"] == "cats-a2"
    assert kinds["PodGroup"][0]["spec"] == {"minMember": 2}
    for pod in kinds["Pod"]:
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["metadata"]["annotations"]["scheduling.volcano.sh/group-name"] == "cats-a2"


def test_operator_image_applies_only_when_the_job_sets_none() -> None:
    assert build(image="registry.local/worker:1")["Pod"][0]["spec"]["containers"][0]["image"] == \
        "registry.local/worker:1"
    spec = make_spec()
    spec.template.image = "mine:2"
    made = ch.children(OWNER, spec, make_plan(), 1, ch.WorkerOptions(image="registry.local/worker:1"))
    pod = next(c for c in made if c["kind"] == "Pod")
    assert pod["spec"]["containers"][0]["image"] == "mine:2"


def test_non_consecutive_ranks_of_a_node_are_refused() -> None:
    plan = make_plan()
    plan.ranks[1].node, plan.ranks[0].node = "gpu-b", "gpu-b"
    plan.ranks[2].node = "gpu-a"
    assert [s.node for s in ch.pod_slots(plan)] == ["gpu-b", "gpu-a"]
    plan.ranks[0].node = "gpu-a"
    with pytest.raises(ValueError, match="not consecutive"):
        ch.pod_slots(plan)


def test_workers_cache_is_the_volume_the_operator_was_given() -> None:
    """Models and compiled artifacts go to /var/cache/stadi: an emptyDir by default, a node directory or a claim
    when the operator's settings name one (the next job then loads instead of copying and compiling)."""
    from stadi_operator.settings import OperatorSettings

    def cache_volume(settings: OperatorSettings) -> dict:
        pod = build(cache=settings.worker_cache)["Pod"][0]
        assert {"name": "cache", "mountPath": "/var/cache/stadi"} in pod["spec"]["containers"][0]["volumeMounts"]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["STADI_CACHE"] == "/var/cache/stadi"
        return next(v for v in pod["spec"]["volumes"] if v["name"] == "cache")

    assert cache_volume(OperatorSettings()) == {"name": "cache", "emptyDir": {}}
    assert cache_volume(OperatorSettings(worker_cache_host_path="/var/cache/stadi")) == {
        "name": "cache", "hostPath": {"path": "/var/cache/stadi", "type": "DirectoryOrCreate"}}
    assert cache_volume(OperatorSettings(worker_cache_claim="stadi-cache", worker_cache_host_path=" ")) == {
        "name": "cache", "persistentVolumeClaim": {"claimName": "stadi-cache"}}


@pytest.mark.parametrize(("fields", "message"), [
    ({"worker_cache_host_path": "cache/stadi"}, "must be an absolute path on the node"),
    ({"worker_cache_host_path": "/var/cache/stadi", "worker_cache_claim": "c"}, "not both"),
])
def test_a_bad_workers_cache_is_refused_by_name(fields: dict, message: str) -> None:
    from pydantic import ValidationError
    from stadi_operator.settings import OperatorSettings

    with pytest.raises(ValidationError, match=message):
        OperatorSettings(**fields)


def test_pods_on_dra_nodes_claim_exactly_their_planned_gpus() -> None:
    """gpu-b publishes its GPUs through DRA: its pod asks no extended resource but names a claim template that
    requests exactly its two planned devices (by index) of the operator's DeviceClass; gpu-a keeps the device
    plugin's resource. Templates come before the pods that name them."""
    made = ch.children(OWNER, make_spec(), make_plan(), 2, ch.WorkerOptions(dra_device_class="gpu.example.com"),
                       dra_nodes=frozenset({"gpu-b"}))
    kinds = [c["kind"] for c in made]
    assert kinds.index("ResourceClaimTemplate") < kinds.index("Pod")
    [template] = [c for c in made if c["kind"] == "ResourceClaimTemplate"]
    a, b = (c for c in made if c["kind"] == "Pod")
    assert template["metadata"]["name"] == "cats-a2-1-gpus" and template["metadata"]["ownerReferences"] == [REF]
    [request] = template["spec"]["spec"]["devices"]["requests"]
    assert request == {"name": "gpus", "exactly": {
        "deviceClassName": "gpu.example.com", "allocationMode": "ExactCount", "count": 2,
        "selectors": [{"cel": {"expression": 'device.attributes["gpu.nvidia.com"].index in [0, 1]'}}]}}
    assert b["spec"]["resourceClaims"] == [{"name": "gpus", "resourceClaimTemplateName": "cats-a2-1-gpus"}]
    resources = b["spec"]["containers"][0]["resources"]
    assert resources["claims"] == [{"name": "gpus"}] and "nvidia.com/gpu" not in resources["limits"]
    assert b["metadata"]["annotations"]["stadi.dev/gpu-indices"] == "0,1"
    assert a["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "resourceClaims" not in a["spec"] and "stadi.dev/gpu-indices" not in a["metadata"]["annotations"]
