"""What creating a DiffusionJob grants (issue 20), on the real API server with the chart's ValidatingAdmissionPolicy
enforced and the operator running with the chart's settings, tried as a tenant: a ServiceAccount that may only
manage DiffusionJobs in its namespace (``test_rbac.tenant``).

The tenant cannot have a pod run an image off the chart's list, use a Secret its Namespace has not marked, or send
prompts over the limits: the API server refuses each with the same message as the operator (``stadi.policy``);
a Secret's mark withdrawn stops the job's next attempt (the operator's line); it cannot reach another namespace's
jobs, pods or Secrets. Worker pods are admitted under Pod Security ``restricted`` (the namespace enforces it, and
refuses a pod that breaks it), and the operator's NetworkPolicy selects exactly them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from test_chart import EXAMPLE_SECRET, JOBS_NS, Stadi, stadi_fixture  # noqa: F401  (the session fixture "stadi")
from test_jobs import finish_pods, pods, status, wait_phase, wait_pods_running
from test_rbac import OTHER_NS, tenant_fixture  # noqa: F401  (the module fixture "tenant")

from stadi.policy import SECRETS_ANNOTATION, Limits
from tests.policy_cases import ALLOWED, IMAGES
from tests.validation_cases import patched

pytestmark = pytest.mark.slow

POLICY = "stadi-jobs.stadi.dev"
LIMITS = Limits()  # the chart's defaults: the release sets no limits


def job(name: str, **changes: Any) -> dict[str, Any]:
    doc = patched(metadata__name=name, spec__model__source="random://tiny", **changes)
    doc["metadata"].pop("namespace")
    return doc


def create(stadi: Stadi, kubeconfig: Path, doc: dict[str, Any], *, namespace: str = JOBS_NS,
           dry_run: bool = True) -> tuple[int, str]:
    """``kubectl create`` as the tenant; (exit code, output)."""
    args = ["create", "-n", namespace, "-f", "-", *(["--dry-run=server"] if dry_run else [])]
    done = stadi.kubectl(*args, input=json.dumps(doc), check=False, kubeconfig=kubeconfig)
    return done.returncode, done.stdout + done.stderr


def refused_by_policy(code: int, out: str, message: str) -> None:
    assert code != 0, out
    assert f"ValidatingAdmissionPolicy '{POLICY}'" in out and "denied request" in out, out
    assert message in out, out


def test_the_policy_is_installed_and_type_checks(stadi: Stadi) -> None:
    def checked() -> dict[str, Any]:
        found = stadi.cluster.kubectl_json("get", "validatingadmissionpolicy", POLICY)
        return dict(found.get("status") or {})

    stadi.cluster.wait_for(lambda: checked().get("observedGeneration") == 1, 60, "the policy type-checked")
    assert not checked().get("typeChecking", {}).get("expressionWarnings"), checked()
    binding = stadi.cluster.kubectl_json("get", "validatingadmissionpolicybinding", POLICY)
    assert binding["spec"]["validationActions"] == ["Deny"]


@pytest.mark.parametrize(("image", "allowed"), IMAGES, ids=[image for image, _ in IMAGES])
def test_an_image_off_the_list_is_refused_by_the_api_server(stadi: Stadi, tenant: Path, image: str,
                                                            allowed: bool) -> None:
    code, out = create(stadi, tenant, job("img", spec__template={"image": image}))
    if allowed:
        assert code == 0, out
    else:
        refused_by_policy(code, out, f"spec.template.image: {image} is not an allowed worker image; allowed: "
                          f"{', '.join(ALLOWED)} (chart value security.allowedImages; an entry ending in / is a "
                          "prefix)")


def test_an_unmarked_secret_is_refused_by_the_api_server(stadi: Stadi, tenant: Path) -> None:
    code, out = create(stadi, tenant, job("sec", spec__output={"uri": "s3://bucket/out",
                                                                "credentialsSecret": "admin-token"}))
    refused_by_policy(code, out, f"spec.output.credentialsSecret: Secret admin-token is not marked for jobs in "
                      f"namespace {JOBS_NS}: its annotation {SECRETS_ANNOTATION} lists {EXAMPLE_SECRET}")


MAX_N, MAX_LEN = LIMITS.max_prompts, LIMITS.max_prompt_length


@pytest.mark.parametrize(("over", "edge", "message"), [
    ({"spec__prompts": ["a cat"] * (MAX_N + 1)}, {"spec__prompts": ["a cat"] * MAX_N},
     f"spec.prompts: {MAX_N + 1} prompts; at most {MAX_N} allowed (chart value limits.maxPrompts)"),
    ({"spec__prompts": ["a cat", "x" * (MAX_LEN + 1), "a dog"]}, {"spec__prompts": ["a cat", "x" * MAX_LEN]},
     f"spec.prompts[1]: {MAX_LEN + 1} characters; at most {MAX_LEN} allowed (chart value limits.maxPromptLength)"),
    ({"spec__negativePrompt": "n" * (MAX_LEN + 1)}, {"spec__negativePrompt": "n" * MAX_LEN},
     f"spec.negativePrompt: {MAX_LEN + 1} characters; at most {MAX_LEN} allowed (chart value "
     "limits.maxPromptLength)"),
], ids=["count", "length", "negative"])
def test_prompts_over_the_limits_are_refused_by_the_api_server(stadi: Stadi, tenant: Path, over: dict[str, Any],
                                                               edge: dict[str, Any], message: str) -> None:
    refused_by_policy(*create(stadi, tenant, job("big", **over)), message)
    code, out = create(stadi, tenant, job("edge", **edge))
    assert code == 0, out  # at the limit is allowed


def test_another_namespace_is_out_of_reach(stadi: Stadi, tenant: Path) -> None:
    code, out = create(stadi, tenant, job("elsewhere"), namespace=OTHER_NS)
    assert code != 0 and "forbidden" in out.lower(), out
    for args in (("get", "pods", "-n", OTHER_NS), ("get", "secrets", "-n", OTHER_NS),
                 ("get", "secrets", "-n", JOBS_NS), ("get", "pods", "-n", JOBS_NS),
                 ("get", "dj", "-n", OTHER_NS)):
        done = stadi.kubectl(*args, check=False, kubeconfig=tenant)
        assert done.returncode != 0 and "forbidden" in done.stderr.lower(), (args, done.stderr)


def test_the_namespace_enforces_restricted_pod_security(stadi: Stadi) -> None:
    """The control: a pod that breaks ``restricted`` is refused in the jobs' namespace (so the worker pods that
    exist there were admitted under it)."""
    privileged = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "too-free"},
                  "spec": {"containers": [{"name": "c", "image": "example.invalid/c:1",
                                           "securityContext": {"privileged": True}}]}}
    done = stadi.kubectl("create", "-n", JOBS_NS, "--dry-run=server", "-f", "-", input=json.dumps(privileged),
                         check=False)
    assert done.returncode != 0 and 'violates PodSecurity "restricted' in done.stderr, done.stderr


def test_a_marked_secret_runs_fenced_and_restricted_until_the_mark_is_withdrawn(stadi: Stadi,
                                                                                 tenant: Path) -> None:
    name = "tenant-job"
    doc = job(name, spec__output={"uri": "s3://bucket/out", "credentialsSecret": EXAMPLE_SECRET,
                                  "endpoint": "http://10.200.0.5:9000"},
              spec__parallelism={"gpus": {"min": 2, "max": 2}})
    code, out = create(stadi, tenant, doc, dry_run=False)
    assert code == 0, out
    try:
        st = wait_phase(stadi, name, "Running")
        found = wait_pods_running(stadi, name, 1, len({rank["node"] for rank in st["plan"]["ranks"]}))
        for pod in found:
            container = pod["spec"]["containers"][0]
            refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e]
            assert refs == [EXAMPLE_SECRET, EXAMPLE_SECRET]
            assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                                    "capabilities": {"drop": ["ALL"]}}
        # The NetworkPolicy selects exactly the job's pods and opens their rendezvous port to the gang.
        policy = stadi.cluster.kubectl_json("get", "networkpolicy", f"{name}-worker", "-n", JOBS_NS)
        selector = policy["spec"]["podSelector"]["matchLabels"]
        selected = stadi.cluster.kubectl_json("get", "pods", "-n", JOBS_NS, "-l",
                                              ",".join(f"{k}={v}" for k, v in selector.items()))["items"]
        assert sorted(p["metadata"]["name"] for p in selected) == sorted(p["metadata"]["name"] for p in found)
        ingress_ports = {p["port"] for p in policy["spec"]["ingress"][0]["ports"]}
        container_ports = {p["containerPort"] for pod in found for p in pod["spec"]["containers"][0]["ports"]}
        assert container_ports <= ingress_ports
        assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": selector}}]
        egress = [peer for rule in policy["spec"]["egress"] for peer in rule.get("to", [])]
        assert {"ipBlock": {"cidr": "10.200.0.0/16"}} in egress  # the chart's storage, not the job's endpoint
        assert {"ipBlock": {"cidr": "10.200.0.5/32"}} not in egress
        # The namespace owner withdraws the mark; a pod fails: the next attempt is refused by the operator.
        stadi.kubectl("annotate", "namespace", JOBS_NS, "--overwrite", f"{SECRETS_ANNOTATION}=another-secret")
        finish_pods(stadi, found[:1], "Failed")
        st = wait_phase(stadi, name, "Failed")
        failed = {c["type"]: c for c in st["conditions"]}["Failed"]
        assert failed["reason"] == "SecretNotAllowed", failed
        assert failed["message"] == (f"spec.output.credentialsSecret: Secret {EXAMPLE_SECRET} is not marked for "
                                     f"jobs in namespace {JOBS_NS}: its annotation {SECRETS_ANNOTATION} lists "
                                     "another-secret")
        assert st["attempts"] == 1 and not pods(stadi, name, 2)
        # The operator's own writes to the job still pass the policy (only a written spec is judged).
        assert status(stadi, name)["phase"] == "Failed"
        assert not stadi.forbidden_in_operator_log(), "\n".join(stadi.forbidden_in_operator_log())
        # And the tenant cannot write the spec again with that Secret.
        edited = copy.deepcopy(doc)
        edited["spec"]["steps"] = 30
        done = stadi.kubectl("apply", "--server-side", "--force-conflicts", "-n", JOBS_NS, "-f", "-",
                             input=json.dumps(edited), check=False, kubeconfig=tenant)
        assert done.returncode != 0 and "is not marked for jobs" in done.stderr, done.stderr
    finally:
        stadi.kubectl("annotate", "namespace", JOBS_NS, "--overwrite", f"{SECRETS_ANNOTATION}={EXAMPLE_SECRET}")
        stadi.kubectl("delete", "dj", name, "-n", JOBS_NS, "--wait=false", check=False)
