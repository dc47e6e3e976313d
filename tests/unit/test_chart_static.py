"""The Helm chart, its plain-YAML rendering and the two Dockerfiles, checked without a cluster or a docker engine.

Needs the ``helm`` binary for the rendering tests (the test binaries of ``make test``, ``$STADI_HELM`` or
``helm`` on PATH). ``manifests/install/stadi.yaml`` is the chart rendered with fixed names; regenerate it with::

    helm template stadi charts/stadi --namespace stadi-system > manifests/install/stadi.yaml
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from stadi_operator.controller.children import DEFAULT_WORKER_IMAGE
from stadi_operator.settings import OperatorSettings

from stadi.api import PodTemplate
from stadi.policy import CHART_VALUES, SECRETS_ANNOTATION, Limits

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "stadi"
INSTALL = ROOT / "manifests" / "install" / "stadi.yaml"
RELEASE, NAMESPACE = "stadi", "stadi-system"
REGENERATE = f"helm template {RELEASE} charts/stadi --namespace {NAMESPACE} > manifests/install/stadi.yaml"
OPERATOR_REPO = "ghcr.io/stadi-dev/stadi-operator"
WORKER_REPO = "ghcr.io/stadi-dev/stadi-worker"
NON_ROOT_UID = 65532


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def chart_meta() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@cache
def helm_binary() -> str | None:
    """helm from $STADI_HELM, the test-binary cache, or PATH."""
    explicit = os.environ.get("STADI_HELM")
    if explicit:
        return explicit
    if os.environ.get("STADI_E2E") == "0":
        return None  # without the control-plane binaries (README: what STADI_E2E=0 skips)
    try:
        from stadi_operator.devcluster import testbin  # the test binaries of `make test`

        cached = testbin.paths()["helm"]
        if os.access(cached, os.X_OK):
            return str(cached)
    except ImportError:
        pass
    return shutil.which("helm")


def helm(*args: str) -> str:
    binary = helm_binary()
    if binary is None:
        pytest.skip("helm not found: run `make test` (builds the test binaries) or set STADI_HELM")
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def render(*sets: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace]
    for item in sets:
        args += ["--set", item]
    return [doc for doc in yaml.safe_load_all(helm(*args)) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name
             and (namespace is None or d["metadata"].get("namespace") == namespace)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """RBAC rules as (apiGroup, resource, verb) triples."""
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def expand(group: str, resources: str, verbs: str) -> Iterator[tuple[str, str, str]]:
    for resource in resources.split():
        for verb in verbs.split():
            yield group, resource, verb


# What the operator's code calls (kube.py, the controller package and kopf's watches/patches), nothing more.
OPERATOR_JOB_RIGHTS = {
    *expand("stadi.dev", "diffusionjobs", "get list watch patch delete"),
    *expand("stadi.dev", "diffusionjobs/status", "patch"),
    *expand("stadi.dev", "diffusionjobs/finalizers", "update"),
    *expand("", "pods", "get list watch create patch delete"),
    *expand("", "configmaps services serviceaccounts", "get create patch"),
    *expand("rbac.authorization.k8s.io", "roles rolebindings", "get create patch"),
    *expand("", "events", "create"),
    *expand("", "namespaces", "get"),  # the job's Namespace: the Secrets it marks for jobs (never a Secret)
    *expand("resource.k8s.io", "resourceclaimtemplates", "get create patch"),
    *expand("kueue.x-k8s.io", "workloads", "get create patch delete"),  # a queued job's Workload per attempt
    *expand("scheduling.volcano.sh", "podgroups", "get create patch delete"),
}
OPERATOR_INVENTORY_RIGHTS = {
    *expand("", "nodes", "list watch"),
    *expand("stadi.dev", "gpunodes", "list watch get create"),  # and learned speeds into their status:
    *expand("stadi.dev", "gpunodes/status", "patch"),
    *expand("resource.k8s.io", "resourceslices resourceclaims", "list watch"),  # GPUs published through DRA
    *expand("kueue.x-k8s.io", "workloadpriorityclasses", "get"),  # a queued job's priority
    *expand("apiextensions.k8s.io", "customresourcedefinitions", "list watch"),  # kopf's resource observation
}
NAMESPACE_OBSERVATION = set(expand("", "namespaces", "list watch"))  # kopf, when it serves a namespace list
AGENT_RIGHTS = {("stadi.dev", "gpunodes", "create"), ("stadi.dev", "gpunodes/status", "patch")}
NETWORK_POLICY_RIGHTS = set(expand("networking.k8s.io", "networkpolicies", "get create patch"))  # when enabled


# --- static: no helm --------------------------------------------------------------------------------------


def test_chart_metadata() -> None:
    meta = chart_meta()
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "stadi"
    assert meta["appVersion"] == project_version()


def test_default_images_are_the_two_images() -> None:
    values = chart_values()
    assert values["operator"]["image"]["repository"] == OPERATOR_REPO
    assert values["agent"]["image"]["repository"] == OPERATOR_REPO  # the agent ships in the operator image
    assert values["operator"]["workerImage"]["repository"] == WORKER_REPO
    # Empty tags mean the appVersion, i.e. the project's version.
    assert values["operator"]["image"]["tag"] == values["agent"]["image"]["tag"] == ""
    assert values["operator"]["workerImage"]["tag"] == ""
    # A job that names no image gets the operator's worker image (the chart's), else the project's default.
    assert PodTemplate().image is None
    assert DEFAULT_WORKER_IMAGE.rsplit(":", 1)[0] == WORKER_REPO


def test_values_match_their_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(chart_values(), schema)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["operator"]["additionalProperties"] is False
    assert schema["properties"]["agent"]["additionalProperties"] is False
    bad = chart_values()
    bad["operator"]["replicas"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_chart_crds_are_the_generated_ones() -> None:
    chart_crds = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert chart_crds == ["diffusionjobs.stadi.dev.yaml", "gpunodes.stadi.dev.yaml"]
    for name in chart_crds:
        assert (CHART / "crds" / name).read_text() == (ROOT / "manifests" / "crds" / name).read_text()


def dockerfile(path: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / path).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    start = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[start:]


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)


def base_image(instructions: list[tuple[str, str]]) -> str:
    image = final_stage(instructions)[0][1].split()[0]
    for key, value in arg_defaults(instructions).items():
        image = image.replace("${" + key + "}", value)
    return image


def user_of(instructions: list[tuple[str, str]]) -> str:
    users = [a for op, a in final_stage(instructions) if op == "USER"]
    assert users, "no USER in the final stage: the image would run as root"
    return users[-1]


def test_operator_dockerfile() -> None:
    instructions = dockerfile("operator/Dockerfile")
    assert base_image(instructions) == "python:3.11-slim"
    user = user_of(instructions)
    assert user.split(":")[0] == str(NON_ROOT_UID)
    runs = " ".join(a for op, a in instructions if op == "RUN")
    assert '".[operator]"' in runs and "-c constraints.txt" in runs
    final = dict(final_stage(instructions))
    assert json.loads(final["ENTRYPOINT"]) == ["stadi"]
    assert json.loads(final["CMD"]) == ["operator"]


def test_worker_dockerfile() -> None:
    instructions = dockerfile("worker/Dockerfile")
    image = base_image(instructions)
    # An official PyTorch CUDA runtime image whose torch is the version constraints.txt pins.
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", image)
    assert match, image
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned and pinned.group(1) == match.group(1)
    user = user_of(instructions)
    assert user.split(":")[0] not in ("0", "root")
    # The operator runs worker pods as this UID (runAsNonRoot needs a numeric USER to verify).
    assert user.split(":")[0] == str(chart_values()["operator"]["workerUid"])
    runs = " ".join(a for op, a in instructions if op == "RUN")
    assert '".[worker]"' in runs and "-c constraints.txt" in runs
    assert json.loads(dict(final_stage(instructions))["ENTRYPOINT"]) == ["stadi"]


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests"):
        assert entry in ignored


# --- rendered by helm -------------------------------------------------------------------------------------


def test_helm_lint_strict() -> None:
    helm("lint", "--strict", str(CHART))
    helm("lint", "--strict", str(CHART), "--set", "operator.watchNamespaces={jobs-a,jobs-b}",
         "--set", "operator.enabled=false", "--set", "agent.runtimeClassName=nvidia")


def test_schema_rejects_unknown_and_bad_values() -> None:
    binary = helm_binary()
    if binary is None:
        pytest.skip("helm not found")
    for bad in ("operator.replicas=2", "operator.unknown=1", "agent.metricsPort=0", "operator.volcano=maybe",
                "unknownTopLevel=1"):
        done = subprocess.run([binary, "template", RELEASE, str(CHART), "--set", bad],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode != 0, f"--set {bad} was accepted"
        assert "values don't meet the specifications of the schema" in done.stderr or "schema" in done.stderr


def test_install_manifests_are_up_to_date() -> None:
    """manifests/install/stadi.yaml is the chart rendered with fixed names."""
    rendered = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE)
    assert INSTALL.exists(), f"manifests/install/stadi.yaml is missing; run: {REGENERATE}"
    assert INSTALL.read_text() == rendered, f"manifests/install/stadi.yaml is stale; run: {REGENERATE}"


def test_operator_deployment_is_locked_down() -> None:
    docs = render()
    deployment = one(docs, "Deployment", "stadi-operator", NAMESPACE)
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "stadi-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == NON_ROOT_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["image"] == f"{OPERATOR_REPO}:{project_version()}"
    assert container["args"][:3] == ["operator", "--liveness", "8080"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STADI_OPERATOR_WORKER_IMAGE"] == f"{WORKER_REPO}:{project_version()}"
    assert env["STADI_OPERATOR_NAMESPACES"] == ""
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_workers_cache_volume_is_passed_to_the_operator() -> None:
    """operator.workerCache names a node directory or a claim for the workers' cache; both at once is refused."""
    env = {e["name"]: e.get("value") for e in one(render("operator.workerCache.hostPath=/var/cache/stadi"),
                                                     "Deployment", "stadi-operator", NAMESPACE)
           ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["STADI_OPERATOR_WORKER_CACHE_HOST_PATH"] == "/var/cache/stadi"
    assert env["STADI_OPERATOR_WORKER_CACHE_CLAIM"] == ""
    binary = helm_binary()
    if binary is None:
        pytest.skip("helm not found")
    for bad in (["operator.workerCache.hostPath=/a", "operator.workerCache.claim=c"],
                ["operator.workerCache.hostPath=relative"]):
        done = subprocess.run([binary, "template", RELEASE, str(CHART), *(a for b in bad for a in ("--set", b))],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode != 0 and "schema" in done.stderr, bad


def test_operator_metrics_service_and_service_monitor() -> None:
    """By default the operator serves /metrics on 9090 behind a Service; a ServiceMonitor on request; port 0 turns
    both off."""
    docs = render()
    container = one(docs, "Deployment", "stadi-operator", NAMESPACE)["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}["STADI_OPERATOR_METRICS_PORT"] == "9090"
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    service = one(docs, "Service", "stadi-operator-metrics", NAMESPACE)
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]
    monitor = one(render("operator.metrics.serviceMonitor.enabled=true"), "ServiceMonitor", "stadi-operator",
                  NAMESPACE)
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    off = render("operator.metrics.port=0", "operator.metrics.serviceMonitor.enabled=true")
    assert not [d for d in off if d["kind"] in ("Service", "ServiceMonitor")]
    env = one(off, "Deployment", "stadi-operator", NAMESPACE)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "STADI_OPERATOR_METRICS_PORT" not in {e["name"] for e in env}


def test_operator_can_be_left_out() -> None:
    docs = render("operator.enabled=false")
    assert not [d for d in docs if d["kind"] == "Deployment"]
    # Its identity and rights stay: an operator run elsewhere authenticates as this ServiceAccount.
    one(docs, "ServiceAccount", "stadi-operator", NAMESPACE)
    one(docs, "ClusterRole", "stadi-operator")
    scaled = one(render("operator.replicas=0"), "Deployment", "stadi-operator", NAMESPACE)
    assert scaled["spec"]["replicas"] == 0


def test_agent_daemonset() -> None:
    docs = render("agent.runtimeClassName=nvidia")
    daemonset = one(docs, "DaemonSet", "stadi-agent", NAMESPACE)
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "stadi-agent"
    assert pod["runtimeClassName"] == "nvidia"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    expressions = [e for term in terms for e in term["matchExpressions"]]
    assert {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]} in expressions
    assert {"key": "nvidia.com/gpu.product", "operator": "Exists"} in expressions
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (container,) = pod["containers"]
    assert container["image"] == f"{OPERATOR_REPO}:{project_version()}"
    assert container["args"][0] == "agent"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    resources = json.dumps(container.get("resources") or {})
    assert "nvidia.com/gpu" not in resources, "the agent must not take a GPU away from the workers"
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "runtimeClassName" not in one(render(), "DaemonSet", "stadi-agent")["spec"]["template"]["spec"]


def test_rbac_is_exactly_what_the_code_uses_cluster_wide_mode() -> None:
    docs = render()
    assert grants(one(docs, "ClusterRole", "stadi-operator")["rules"]) == OPERATOR_JOB_RIGHTS
    assert grants(one(docs, "ClusterRole", "stadi-operator-inventory")["rules"]) == OPERATOR_INVENTORY_RIGHTS
    assert grants(one(docs, "ClusterRole", "stadi-agent")["rules"]) == AGENT_RIGHTS
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    for name, sa in (("stadi-operator", "stadi-operator"), ("stadi-operator-inventory", "stadi-operator"),
                     ("stadi-agent", "stadi-agent")):
        binding = one(docs, "ClusterRoleBinding", name)
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]


def test_rbac_per_namespace_mode() -> None:
    docs = render("operator.watchNamespaces={jobs-a,jobs-b}", "operator.volcano=off")
    cluster_roles = {d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"}
    assert cluster_roles == {"stadi-operator-inventory", "stadi-agent"}  # no cluster-wide pods or jobs
    inventory = grants(one(docs, "ClusterRole", "stadi-operator-inventory")["rules"])
    assert inventory == OPERATOR_INVENTORY_RIGHTS | NAMESPACE_OBSERVATION
    for ns in ("jobs-a", "jobs-b"):
        role = one(docs, "Role", "stadi-operator", ns)
        assert grants(role["rules"]) == {g for g in OPERATOR_JOB_RIGHTS if g[0] != "scheduling.volcano.sh"}
        binding = one(docs, "RoleBinding", "stadi-operator", ns)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "stadi-operator", "namespace": NAMESPACE}]
    deployment = one(docs, "Deployment", "stadi-operator", NAMESPACE)
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["STADI_OPERATOR_NAMESPACES"] == "jobs-a,jobs-b"


def test_no_rule_grants_wildcards_secrets_or_node_writes() -> None:
    for docs in (render(), render("operator.watchNamespaces={jobs}")):
        for doc in docs:
            if doc["kind"] not in ("Role", "ClusterRole"):
                continue
            for group, resource, verb in grants(doc["rules"]):
                where = f"{doc['kind']} {doc['metadata']['name']}: {group}/{resource} {verb}"
                assert "*" not in (group, resource, verb), where
                assert resource not in ("secrets", "pods/exec", "pods/attach", "nodes/proxy"), where
                assert not (resource.startswith("nodes") and verb not in ("get", "list", "watch")), where
                assert verb not in ("escalate", "bind", "impersonate"), where


# --- what a job may ask for (issue 20) --------------------------------------------------------------------

API_SERVER_RULE = '[{"to":[{"ipBlock":{"cidr":"10.0.0.1/32"}}],"ports":[{"protocol":"TCP","port":6443}]}]'


def test_limits_defaults_are_the_pythons() -> None:
    values = chart_values()["limits"]
    assert {CHART_VALUES[name]: getattr(Limits(), name) for name in CHART_VALUES} == {
        f"limits.{key}": value for key, value in values.items()}


def test_admission_policy_takes_the_chart_lists_and_limits_as_parameters() -> None:
    docs = render("security.allowedImages={registry.local/team/,sha256:" + "a" * 64 + "}", "limits.maxPrompts=7")
    params = one(docs, "ConfigMap", "stadi-job-policy", NAMESPACE)
    assert params["data"] == {"images": f"{WORKER_REPO},registry.local/team/,sha256:{'a' * 64}", "maxPrompts": "7",
                              "maxPromptLength": str(Limits().max_prompt_length)}
    policy = one(docs, "ValidatingAdmissionPolicy", "stadi-jobs.stadi.dev")
    assert policy["spec"]["paramKind"] == {"apiVersion": "v1", "kind": "ConfigMap"}
    assert policy["spec"]["failurePolicy"] == "Fail"
    # the annotation the operator reads is the one the policy reads
    assert f"'{SECRETS_ANNOTATION}'" in json.dumps(policy["spec"]["variables"])
    binding = one(docs, "ValidatingAdmissionPolicyBinding", "stadi-jobs.stadi.dev")
    assert binding["spec"]["policyName"] == "stadi-jobs.stadi.dev"
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["paramRef"] == {"name": "stadi-job-policy", "namespace": NAMESPACE,
                                           "parameterNotFoundAction": "Deny"}
    env = {e["name"]: e.get("value") for e in
           one(docs, "Deployment", "stadi-operator", NAMESPACE)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["STADI_OPERATOR_ALLOWED_IMAGES"] == params["data"]["images"]  # one list, two lines of defence
    assert env["STADI_OPERATOR_MAX_PROMPTS"] == "7"
    assert env["STADI_OPERATOR_MAX_PROMPTS_FROM_BYTES"] == str(Limits().max_prompts_from_bytes)
    assert not [d for d in render("security.admissionPolicy=false") if "Admission" in d["kind"]]


def test_network_policy_settings_reach_the_operator_and_its_rights(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [doc for doc in yaml.safe_load_all(helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set", "networkPolicy.enabled=true",
        "--set-json", f"networkPolicy.apiServer={API_SERVER_RULE}")) if doc]
    container = one(docs, "Deployment", "stadi-operator", NAMESPACE)["spec"]["template"]["spec"]["containers"][0]
    for item in container["env"]:
        if item["name"].startswith("STADI_OPERATOR_"):
            monkeypatch.setenv(item["name"], item["value"])
    settings = OperatorSettings()  # read from the environment the chart gives the operator
    assert settings.network_policy and settings.collective_ports == (32768, 60999)
    assert [rule["ports"][0]["port"] for rule in settings.worker_egress] == [53, 6443]  # DNS, then the API server
    assert grants(one(docs, "ClusterRole", "stadi-operator")["rules"]) == OPERATOR_JOB_RIGHTS | NETWORK_POLICY_RIGHTS
    assert NETWORK_POLICY_RIGHTS.isdisjoint(grants(one(render(), "ClusterRole", "stadi-operator")["rules"]))


def test_network_policy_needs_the_api_server_rule() -> None:
    binary = helm_binary()
    if binary is None:
        pytest.skip("helm not found")
    done = subprocess.run([binary, "template", RELEASE, str(CHART), "--set", "networkPolicy.enabled=true"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "networkPolicy.apiServer" in done.stderr
