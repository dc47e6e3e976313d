"""Least privilege, checked on the API server: a ``kubectl auth can-i --as`` matrix for each ServiceAccount of the
chart (operator, agent), for a job's worker ServiceAccount (created by the operator) and for a tenant that may only
manage DiffusionJobs in its namespace (README, "Security model"): what it needs → yes, the rest (Secrets, Node
writes, pods/exec, other namespaces, other jobs, RBAC escalation, the admission policy and its parameters, the
Namespace's marks) → no."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_chart import AGENT_SA, JOBS_NS, OPERATOR_SA, ROOT, SYSTEM_NS, Stadi, stadi_fixture  # noqa: F401  (the session fixture "stadi")

pytestmark = pytest.mark.slow

OPERATOR = f"system:serviceaccount:{SYSTEM_NS}:{OPERATOR_SA}"
AGENT = f"system:serviceaccount:{SYSTEM_NS}:{AGENT_SA}"
PROBE_JOB = "rbac-probe"
OTHER_NS = "default"

# (verb, resource[/name], namespace or None for cluster scope / all namespaces, subresource or "", allowed)
Check = tuple[str, str, str | None, str, bool]

OPERATOR_MATRIX: list[Check] = [
    # what its code does, in the watched namespace
    ("watch", "diffusionjobs.stadi.dev", JOBS_NS, "", True),
    ("list", "diffusionjobs.stadi.dev", JOBS_NS, "", True),
    ("patch", "diffusionjobs.stadi.dev", JOBS_NS, "", True),
    ("delete", "diffusionjobs.stadi.dev", JOBS_NS, "", True),
    ("patch", "diffusionjobs.stadi.dev", JOBS_NS, "status", True),
    ("get", "diffusionjobs.stadi.dev", JOBS_NS, "status", False),
    ("update", "diffusionjobs.stadi.dev", JOBS_NS, "finalizers", True),
    ("create", "pods", JOBS_NS, "", True),
    ("delete", "pods", JOBS_NS, "", True),
    ("watch", "pods", JOBS_NS, "", True),
    ("create", "configmaps", JOBS_NS, "", True),
    ("create", "services", JOBS_NS, "", True),
    ("create", "serviceaccounts", JOBS_NS, "", True),
    ("create", "roles.rbac.authorization.k8s.io", JOBS_NS, "", True),
    ("create", "rolebindings.rbac.authorization.k8s.io", JOBS_NS, "", True),
    ("create", "events", JOBS_NS, "", True),
    # the job's Namespace, for the Secrets it marks for jobs (its annotation), and the per-job NetworkPolicy
    ("get", f"namespaces/{JOBS_NS}", JOBS_NS, "", True),
    ("create", "networkpolicies.networking.k8s.io", JOBS_NS, "", True),
    ("patch", "networkpolicies.networking.k8s.io", JOBS_NS, "", True),
    # inventory, cluster-wide and read-only
    ("list", "nodes", None, "", True),
    ("watch", "nodes", None, "", True),
    ("watch", "gpunodes.stadi.dev", None, "", True),
    ("watch", "resourceslices.resource.k8s.io", None, "", True),
    ("list", "resourceclaims.resource.k8s.io", None, "", True),
    ("create", "resourceclaimtemplates.resource.k8s.io", JOBS_NS, "", True),
    # Kueue: a queued job's Workload per attempt, and the priority class it names
    ("create", "workloads.kueue.x-k8s.io", JOBS_NS, "", True),
    ("delete", "workloads.kueue.x-k8s.io", JOBS_NS, "", True),
    ("get", "workloadpriorityclasses.kueue.x-k8s.io", None, "", True),
    # kopf's own observation of CRDs and (serving a namespace list) namespaces
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", None, "", True),
    ("list", "namespaces", None, "", True),
    # nothing more
    ("create", "diffusionjobs.stadi.dev", JOBS_NS, "", False),
    ("update", "diffusionjobs.stadi.dev", JOBS_NS, "", False),
    ("get", "secrets", JOBS_NS, "", False),
    ("list", "secrets", JOBS_NS, "", False),
    ("watch", "secrets", JOBS_NS, "", False),
    ("list", "secrets", None, "", False),
    ("get", "secrets", SYSTEM_NS, "", False),
    ("get", f"namespaces/{OTHER_NS}", OTHER_NS, "", False),  # only the watched namespaces'
    ("patch", f"namespaces/{JOBS_NS}", JOBS_NS, "", False),  # reads the marks, never sets them
    ("delete", "networkpolicies.networking.k8s.io", JOBS_NS, "", False),
    ("create", "networkpolicies.networking.k8s.io", OTHER_NS, "", False),
    ("patch", "validatingadmissionpolicies.admissionregistration.k8s.io", None, "", False),
    ("create", "pods", JOBS_NS, "exec", False),
    ("get", "pods", JOBS_NS, "log", False),
    ("create", "serviceaccounts", JOBS_NS, "token", False),
    ("delete", "configmaps", JOBS_NS, "", False),
    ("update", "configmaps", JOBS_NS, "", False),
    ("patch", "nodes", None, "", False),
    ("delete", "nodes", None, "", False),
    ("update", "nodes", None, "status", False),
    ("get", "nodes", None, "proxy", False),
    ("create", "gpunodes.stadi.dev", None, "", True),  # where no agent made one: learned speeds go there
    ("patch", "gpunodes.stadi.dev", None, "status", True),
    ("delete", "gpunodes.stadi.dev", None, "", False),
    ("patch", "gpunodes.stadi.dev", None, "", False),
    ("list", "pods", None, "", False),  # namespaced mode: not across namespaces
    ("create", "pods", OTHER_NS, "", False),
    ("list", "diffusionjobs.stadi.dev", OTHER_NS, "", False),
    ("create", "pods", "kube-system", "", False),
    ("create", "clusterroles.rbac.authorization.k8s.io", None, "", False),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, "", False),
    ("escalate", "roles.rbac.authorization.k8s.io", JOBS_NS, "", False),
    ("bind", "roles.rbac.authorization.k8s.io", JOBS_NS, "", False),
    ("delete", "roles.rbac.authorization.k8s.io", JOBS_NS, "", False),
    ("impersonate", "serviceaccounts", JOBS_NS, "", False),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", None, "", False),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io", None, "", False),
    ("delete", "namespaces", None, "", False),
    ("create", "podgroups.scheduling.volcano.sh", JOBS_NS, "", False),  # volcano=off in this release
    ("create", "resourceclaims.resource.k8s.io", JOBS_NS, "", False),  # the resourceclaim controller does
    ("create", "resourceslices.resource.k8s.io", None, "", False),
    ("create", "resourceclaimtemplates.resource.k8s.io", OTHER_NS, "", False),
    ("patch", "workloads.kueue.x-k8s.io", JOBS_NS, "status", False),  # Kueue writes it
    ("create", "workloads.kueue.x-k8s.io", OTHER_NS, "", False),
    ("create", "clusterqueues.kueue.x-k8s.io", None, "", False),
    ("create", "localqueues.kueue.x-k8s.io", JOBS_NS, "", False),
    ("create", "workloadpriorityclasses.kueue.x-k8s.io", None, "", False),
]

AGENT_MATRIX: list[Check] = [
    ("create", "gpunodes.stadi.dev", None, "", True),
    ("patch", "gpunodes.stadi.dev", None, "status", True),
    ("get", "gpunodes.stadi.dev", None, "", False),
    ("list", "gpunodes.stadi.dev", None, "", False),
    ("patch", "gpunodes.stadi.dev", None, "", False),
    ("delete", "gpunodes.stadi.dev", None, "", False),
    ("list", "nodes", None, "", False),
    ("patch", "nodes", None, "", False),
    ("patch", "nodes", None, "status", False),
    ("list", "pods", None, "", False),
    ("create", "pods", SYSTEM_NS, "", False),
    ("get", "secrets", SYSTEM_NS, "", False),
    ("list", "secrets", None, "", False),
    ("list", "diffusionjobs.stadi.dev", None, "", False),
    ("create", "pods", SYSTEM_NS, "exec", False),
]


def worker_matrix(job: str) -> list[Check]:
    return [
        ("patch", f"diffusionjobs.stadi.dev/{job}", JOBS_NS, "status", True),
        ("get", f"diffusionjobs.stadi.dev/{job}", JOBS_NS, "status", False),  # rank 0 only sends patches
        ("patch", "diffusionjobs.stadi.dev/another-job", JOBS_NS, "status", False),
        ("patch", "diffusionjobs.stadi.dev", JOBS_NS, "status", False),  # any job
        ("patch", f"diffusionjobs.stadi.dev/{job}", JOBS_NS, "", False),  # its spec
        ("delete", f"diffusionjobs.stadi.dev/{job}", JOBS_NS, "", False),
        ("get", f"diffusionjobs.stadi.dev/{job}", JOBS_NS, "", False),
        ("list", "diffusionjobs.stadi.dev", JOBS_NS, "", False),
        ("get", "secrets", JOBS_NS, "", False),
        ("get", "configmaps", JOBS_NS, "", False),
        ("list", "pods", JOBS_NS, "", False),
        ("create", "pods", JOBS_NS, "", False),
        ("create", "pods", JOBS_NS, "exec", False),
        ("list", "nodes", None, "", False),
        ("patch", f"diffusionjobs.stadi.dev/{job}", OTHER_NS, "status", False),
    ]


TENANT_SA = "tenant"
TENANT = f"system:serviceaccount:{JOBS_NS}:{TENANT_SA}"
# A tenant's rights: DiffusionJobs in its namespace, nothing else (what the README's security model assumes).
TENANT_ROLE = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "diffusionjob-tenant", "namespace": JOBS_NS},
               "rules": [{"apiGroups": ["stadi.dev"], "resources": ["diffusionjobs"],
                          "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}]}

TENANT_MATRIX: list[Check] = [
    ("create", "diffusionjobs.stadi.dev", JOBS_NS, "", True),
    ("delete", "diffusionjobs.stadi.dev", JOBS_NS, "", True),
    ("patch", "diffusionjobs.stadi.dev", JOBS_NS, "status", False),  # the status is the operator's
    # another namespace: no jobs, pods or Secrets
    ("create", "diffusionjobs.stadi.dev", OTHER_NS, "", False),
    ("list", "diffusionjobs.stadi.dev", OTHER_NS, "", False),
    ("delete", "diffusionjobs.stadi.dev", OTHER_NS, "", False),
    ("get", "pods", OTHER_NS, "", False),
    ("get", "secrets", OTHER_NS, "", False),
    # its own namespace: no pods (so no image of its choosing), no Secrets, no marks
    ("create", "pods", JOBS_NS, "", False),
    ("get", "pods", JOBS_NS, "", False),
    ("create", "pods", JOBS_NS, "exec", False),
    ("get", "secrets", JOBS_NS, "", False),
    ("list", "secrets", JOBS_NS, "", False),
    ("create", "secrets", JOBS_NS, "", False),
    ("patch", f"namespaces/{JOBS_NS}", JOBS_NS, "", False),
    ("patch", "networkpolicies.networking.k8s.io", JOBS_NS, "", False),
    ("delete", "networkpolicies.networking.k8s.io", JOBS_NS, "", False),
    ("create", "roles.rbac.authorization.k8s.io", JOBS_NS, "", False),
    ("create", "serviceaccounts", JOBS_NS, "token", False),  # e.g. the workers' token
    # the policy, its binding and its parameters
    ("patch", "configmaps/stadi-job-policy", SYSTEM_NS, "", False),
    ("delete", "validatingadmissionpolicies.admissionregistration.k8s.io", None, "", False),
    ("delete", "validatingadmissionpolicybindings.admissionregistration.k8s.io", None, "", False),
]


@pytest.fixture(scope="module", name="tenant")
def tenant_fixture(stadi: Stadi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A ServiceAccount that may only manage DiffusionJobs in the jobs' namespace; its kubeconfig."""
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "diffusionjob-tenant", "namespace": JOBS_NS},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "diffusionjob-tenant"},
               "subjects": [{"kind": "ServiceAccount", "name": TENANT_SA, "namespace": JOBS_NS}]}
    stadi.kubectl("create", "serviceaccount", TENANT_SA, "-n", JOBS_NS)
    stadi.cluster.apply([TENANT_ROLE, binding])
    try:
        yield stadi.cluster.sa_kubeconfig(TENANT_SA, JOBS_NS, path=tmp_path_factory.mktemp("tenant") / "kubeconfig")
    finally:
        stadi.kubectl("delete", "rolebinding,role", "diffusionjob-tenant", "-n", JOBS_NS, "--ignore-not-found")
        stadi.kubectl("delete", "serviceaccount", TENANT_SA, "-n", JOBS_NS, "--ignore-not-found")


def can_i(stadi: Stadi, user: str, check: Check) -> bool:
    verb, resource, namespace, subresource, _ = check
    # The groups a ServiceAccount token carries, so that rights granted to them count too.
    sa_ns = user.split(":")[2]
    args = ["auth", "can-i", verb, resource, f"--as={user}", "--as-group=system:serviceaccounts",
            f"--as-group=system:serviceaccounts:{sa_ns}", "--as-group=system:authenticated"]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    if subresource:
        args.append(f"--subresource={subresource}")
    done = stadi.kubectl(*args, check=False)
    answer = done.stdout.strip().split()[0] if done.stdout.strip() else ""
    assert answer in ("yes", "no"), f"kubectl {' '.join(args)}: {done.stdout}{done.stderr}"
    return answer == "yes"


def assert_matrix(stadi: Stadi, user: str, matrix: list[Check]) -> None:
    wrong = []
    for check in matrix:
        got = can_i(stadi, user, check)
        if got != check[4]:
            verb, resource, namespace, subresource, want = check
            wrong.append(f"{verb} {resource}{'/' + subresource if subresource else ''} in "
                         f"{namespace or 'all namespaces'}: can-i says {'yes' if got else 'no'}, "
                         f"want {'yes' if want else 'no'}")
    assert not wrong, f"{user}:\n" + "\n".join(wrong)


def test_operator_service_account(stadi: Stadi) -> None:
    assert_matrix(stadi, OPERATOR, OPERATOR_MATRIX)


def test_agent_service_account(stadi: Stadi) -> None:
    assert_matrix(stadi, AGENT, AGENT_MATRIX)


def test_tenant_may_manage_jobs_in_its_namespace_only(stadi: Stadi, tenant: Path) -> None:
    assert_matrix(stadi, TENANT, TENANT_MATRIX)


@pytest.fixture
def probe_job(stadi: Stadi) -> Iterator[str]:
    manifest = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-sdxl.yaml").read_text())
    manifest["metadata"]["name"] = PROBE_JOB
    stadi.cluster.apply(manifest, "-n", JOBS_NS)
    try:
        stadi.cluster.wait_for(lambda: stadi.kubectl("get", "rolebinding", f"{PROBE_JOB}-worker", "-n", JOBS_NS,
                                                     check=False).returncode == 0, 60, "the job's worker RBAC")
        yield PROBE_JOB
    finally:
        stadi.kubectl("delete", "diffusionjob", PROBE_JOB, "-n", JOBS_NS, "--wait=false", check=False)


def test_worker_service_account_patches_only_its_job_status(stadi: Stadi, probe_job: str) -> None:
    worker = f"system:serviceaccount:{JOBS_NS}:{probe_job}-worker"
    assert_matrix(stadi, worker, worker_matrix(probe_job))


def test_operator_cannot_escalate_through_the_roles_it_creates(stadi: Stadi) -> None:
    """The operator may create Roles, but only with rights it holds itself (RBAC escalation prevention): the
    per-job worker Role works, a Role granting Secrets does not."""
    as_operator = {"kubeconfig": stadi.operator_kubeconfig}
    ok = stadi.kubectl("create", "role", "e2e-like-worker", "-n", JOBS_NS, "--verb=patch",
                       "--resource=diffusionjobs.stadi.dev/status", "--resource-name=some-job", **as_operator)
    assert "created" in ok.stdout
    try:
        refused = stadi.kubectl("create", "role", "e2e-secrets", "-n", JOBS_NS, "--verb=get",
                                "--resource=secrets", check=False, **as_operator)
        assert refused.returncode != 0
        assert "forbidden" in refused.stderr.lower() and "not currently held" in refused.stderr, refused.stderr
        elsewhere = stadi.kubectl("create", "role", "e2e-elsewhere", "-n", OTHER_NS, "--verb=get",
                                  "--resource=configmaps", check=False, **as_operator)
        assert elsewhere.returncode != 0 and "forbidden" in elsewhere.stderr.lower()
    finally:
        stadi.kubectl("delete", "role", "e2e-like-worker", "e2e-secrets", "-n", JOBS_NS, "--ignore-not-found")
