"""What the operator lets a job ask for (issue 20), the second line behind the chart's admission policy, against
kmock: worker images off the list, Secrets the Namespace has not marked (read from the Namespace's annotation,
never from the Secret) and prompts over the limits fail the job before any child exists, with a condition naming
the field and what is allowed; a mark withdrawn stops the next attempt; the per-job NetworkPolicy fences the
gang's pods."""

from __future__ import annotations

from typing import Any

import kmock as kmocklib
import pytest
from stadi_operator.controller import handlers
from stadi_operator.settings import OperatorSettings

from stadi.policy import SECRETS_ANNOTATION
from tests.operator.test_handlers import NS, Cluster
from tests.policy_cases import EXTRA, IMAGES, WORKER_REPO

pytestmark = pytest.mark.asyncio
NETWORK_POLICIES = "networking.k8s.io/v1/networkpolicies"
DNS = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
       "ports": [{"protocol": "UDP", "port": 53}]}


class Tenancy(Cluster):
    """The kmock cluster with the operator's settings of a chart release and the job's Namespace (kmock serves no
    Namespace object: a reaction answers its GET with the annotations of the moment)."""

    def __init__(self, server: kmocklib.KubernetesEmulator) -> None:
        super().__init__(server)
        self.runtime.settings = OperatorSettings(allowed_images=EXTRA, worker_image=f"{WORKER_REPO}:e2e",
                                                 max_prompts=3, max_prompt_length=20)
        server.resources[NETWORK_POLICIES] = kmocklib.ResourceInfo(namespaced=True)
        self.annotations: dict[str, str] = {}
        server[f"get /api/v1/namespaces/{NS}"] << (lambda: {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "annotations": dict(self.annotations)}})

    def mark(self, secrets: str | None) -> None:
        """The namespace owner's mark: the Namespace annotation listing the Secrets jobs may use."""
        self.annotations = {SECRETS_ANNOTATION: secrets} if secrets is not None else {}


@pytest.fixture
def cluster(kmock: kmocklib.KubernetesEmulator) -> Tenancy:
    return Tenancy(kmock)


def refused(cluster: Tenancy, reason: str) -> str:
    """The job failed for ``reason`` before any child: its Valid condition's message."""
    assert cluster.status()["phase"] == "Failed"
    valid, failed = cluster.condition("Valid"), cluster.condition("Failed")
    assert (valid["status"], valid["reason"], failed["reason"]) == ("False", reason, reason)
    assert cluster.reasons() == [reason]
    assert cluster.pods() == {} and cluster.live("v1/configmaps") == {}
    return str(valid["message"])


@pytest.mark.parametrize(("image", "allowed"), IMAGES, ids=[image for image, _ in IMAGES])
async def test_a_worker_image_off_the_list_is_refused(cluster: Tenancy, image: str, allowed: bool) -> None:
    cluster.add_job(template={"image": image})
    await cluster.create()
    if allowed:
        assert cluster.status()["phase"] == "Scheduling"
        assert {p["spec"]["containers"][0]["image"] for p in cluster.pods().values()} == {image}
    else:
        assert refused(cluster, "ImageNotAllowed") == (
            f"spec.template.image: {image} is not an allowed worker image; allowed: {WORKER_REPO}, "
            f"{', '.join(EXTRA)} (chart value security.allowedImages; an entry ending in / is a prefix)")


async def test_a_job_without_an_image_gets_the_operators(cluster: Tenancy) -> None:
    cluster.add_job()
    await cluster.create()
    assert {p["spec"]["containers"][0]["image"] for p in cluster.pods().values()} == {f"{WORKER_REPO}:e2e"}


@pytest.mark.parametrize("annotation", [None, "", "other, s3-creds-old"])
async def test_a_secret_the_namespace_has_not_marked_is_refused(cluster: Tenancy, annotation: str | None) -> None:
    cluster.mark(annotation)
    cluster.add_job(output={"uri": "s3://bucket/cats", "credentialsSecret": "s3-creds"})
    await cluster.create()
    listed = "other, s3-creds-old" if annotation else "no Secret"
    assert refused(cluster, "SecretNotAllowed") == (
        f"spec.output.credentialsSecret: Secret s3-creds is not marked for jobs in namespace {NS}: its "
        f"annotation {SECRETS_ANNOTATION} lists {listed}")
    # the operator looked at the Namespace only: no request for any Secret
    assert not [r for r in cluster.server if "secrets" in str(r.resource)]


async def test_a_marked_secret_reaches_the_workers_and_a_withdrawn_mark_stops_the_next_attempt(
        cluster: Tenancy) -> None:
    cluster.mark("other,s3-creds")
    cluster.add_job(output={"uri": "s3://bucket/cats", "credentialsSecret": "s3-creds"})
    await cluster.create()
    assert cluster.status()["phase"] == "Scheduling"
    pods = cluster.pods()
    for pod in pods.values():
        refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in pod["spec"]["containers"][0]["env"] if "valueFrom" in e]
        assert refs == ["s3-creds", "s3-creds"]
    cluster.mark("other")  # the owner withdraws it; then a pod fails
    first = sorted(pods)[0]
    cluster.set_pod(first, "Failed", reason="Error")
    await cluster.call(handlers.reconcile)
    assert cluster.status()["phase"] == "Failed"
    assert cluster.condition("Failed")["reason"] == "SecretNotAllowed"
    assert set(cluster.pods()) == {first}  # the failed pod kept for its logs, the other stopped, no attempt 2
    assert cluster.status()["attempts"] == 1


@pytest.mark.parametrize(("spec", "message"), [
    ({"prompts": ["a cat"] * 5}, "spec.prompts: 5 prompts; at most 3 allowed (chart value limits.maxPrompts)"),
    ({"prompts": ["a cat", "c" * 25]},
     "spec.prompts[1]: 25 characters; at most 20 allowed (chart value limits.maxPromptLength)"),
    ({"negativePrompt": "n" * 21},
     "spec.negativePrompt: 21 characters; at most 20 allowed (chart value limits.maxPromptLength)"),
])
async def test_prompts_over_the_limits_are_refused(cluster: Tenancy, spec: dict[str, Any], message: str) -> None:
    cluster.add_job(**spec)
    await cluster.create()
    assert refused(cluster, "LimitExceeded") == message


async def test_the_limits_reach_the_workers(cluster: Tenancy) -> None:
    cluster.add_job()
    await cluster.create()
    for pod in cluster.pods().values():
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert (env["STADI_MAX_PROMPTS"], env["STADI_MAX_PROMPT_LENGTH"], env["STADI_MAX_PROMPTS_FROM_BYTES"]) == (
            "3", "20", str(cluster.runtime.settings.max_prompts_from_bytes))


async def test_the_network_policy_fences_the_gang_before_any_pod_runs(cluster: Tenancy) -> None:
    cluster.runtime.settings = OperatorSettings(network_policy=True, worker_egress=[DNS], rendezvous_port=29500,
                                                collective_ports=(40000, 40100))
    cluster.add_job(parallelism={"gpus": {"min": 3}})  # gpu-a and gpu-b: two pods
    await cluster.create()
    [policy] = cluster.live(NETWORK_POLICIES).values()
    pods = cluster.pods()
    assert len(pods) == 2
    posts = [r.resource for r in cluster.server if r.method == "POST"]
    assert posts.index(kmocklib.resource(NETWORK_POLICIES)) < posts.index(kmocklib.resource("v1/pods"))
    spec = policy["spec"]
    selector = spec["podSelector"]["matchLabels"]
    for pod in pods.values():
        assert selector.items() <= pod["metadata"]["labels"].items()
        assert policy["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["ownerReferences"][0]["uid"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    ports = [{"protocol": "TCP", "port": 29500}, {"protocol": "TCP", "port": 40000, "endPort": 40100}]
    assert spec["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}], "ports": ports}]
    assert spec["egress"] == [{"to": [{"podSelector": {"matchLabels": selector}}], "ports": ports}, DNS]
    container_ports = {p["containerPort"] for pod in pods.values() for p in pod["spec"]["containers"][0]["ports"]}
    assert container_ports == {29500}


async def test_no_network_policy_unless_enabled(cluster: Tenancy) -> None:
    cluster.add_job()
    await cluster.create()
    assert cluster.pods() and cluster.live(NETWORK_POLICIES) == {}
