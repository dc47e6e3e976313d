"""The Helm chart on a real control plane: ``helm install`` of charts/stadi, with the operator run as a local
process that authenticates with the chart's operator ServiceAccount token, so the chart's RBAC is what the
operator gets.

The session fixture :func:`stadi` installs the release once (``test_jobs``, ``test_rbac`` and ``test_validation``
import it from here) and starts ``stadi operator --namespace stadi-jobs`` with a TokenRequest token of
``stadi-system/stadi-operator``. The chart renders the operator's rights per watched namespace
(``operator.watchNamespaces``) and leaves its Deployment out (``operator.enabled=false``: no image registry here);
the operator's security settings (allowed images, limits, NetworkPolicy rules) are those the chart would give the
Deployment (``SECURITY_SETTINGS``). The jobs' namespace is as a namespace owner would set it up: Pod Security
``restricted`` enforced, and the example jobs' Secret marked for jobs (``stadi.dev/job-secrets``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from stadi_operator.devcluster.cluster import DevCluster
from stadi_operator.devcluster.nodes import DEFAULT_NODES, GPUNodeSpec

from stadi.policy import SECRETS_ANNOTATION
from tests.policy_cases import EXTRA

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "stadi"
RELEASE = "stadi"
SYSTEM_NS = "stadi-system"
JOBS_NS = "stadi-jobs"
OPERATOR_SA = "stadi-operator"
AGENT_SA = "stadi-agent"
_STASH = pytest.StashKey["Stadi"]()
# The operator exactly as users run it: the project's `stadi` console script.
# The operator's worker image setting (the chart's operator.workerImage): used when a job names none.
WORKER_IMAGE = "ghcr.io/stadi-dev/stadi-worker:e2e"
OPERATOR_COMMAND = [str(Path(sys.executable).with_name("stadi")), "operator"]
# The release's security values (tests/policy_cases.py judges images against them), with the worker pods' egress:
# DNS (the chart's default), the API server on loopback, and a storage network.
EXAMPLE_SECRET = "stadi-s3-credentials"  # what manifests/examples name in output.credentialsSecret
API_SERVER_EGRESS = '[{"to":[{"ipBlock":{"cidr":"127.0.0.1/32"}}],"ports":[{"protocol":"TCP","port":6443}]}]'
STORAGE_EGRESS = '[{"to":[{"ipBlock":{"cidr":"10.200.0.0/16"}}],"ports":[{"protocol":"TCP","port":9000}]}]'
HELM_VALUES = ["--set", "operator.enabled=false", "--set", f"operator.watchNamespaces={{{JOBS_NS}}}",
               "--set", "operator.volcano=off", "--set", f"security.allowedImages={{{','.join(EXTRA)}}}",
               "--set", "networkPolicy.enabled=true", "--set-json", f"networkPolicy.apiServer={API_SERVER_EGRESS}",
               "--set-json", f"networkPolicy.storage={STORAGE_EGRESS}"]
SECURITY_SETTINGS = ("ALLOWED_IMAGES", "MAX_PROMPTS", "MAX_PROMPT_LENGTH", "MAX_PROMPTS_FROM_BYTES", "NETWORK_POLICY",
                     "COLLECTIVE_PORTS", "WORKER_EGRESS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stadi:
    """The installed release and the running operator."""

    cluster: DevCluster
    operator: subprocess.Popen[bytes]
    operator_log: Path
    operator_kubeconfig: Path
    liveness_port: int
    metrics_port: int
    install_output: str

    release: str = RELEASE
    system_ns: str = SYSTEM_NS
    jobs_ns: str = JOBS_NS

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, **kw)

    def helm(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(self.cluster.bin / "helm"), *args], capture_output=True, text=True,
                              env=self.cluster.env(), timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def operator_log_tail(self, lines: int = 60) -> str:
        text = self.operator_log.read_text(errors="replace") if self.operator_log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def assert_operator_alive(self) -> None:
        code = self.operator.poll()
        assert code is None, f"the operator exited with {code}:\n{self.operator_log_tail()}"

    def forbidden_in_operator_log(self) -> list[str]:
        """Lines where the operator was refused by the API server (its RBAC is missing something)."""
        text = self.operator_log.read_text(errors="replace") if self.operator_log.exists() else ""
        return [line for line in text.splitlines() if " 403" in line or "Forbidden" in line or "forbidden" in line]


def helm_install(cluster: DevCluster) -> str:
    """``helm install`` into stadi-system: CRDs, RBAC, agent DaemonSet; operator Deployment left out."""
    cluster.kubectl("create", "namespace", JOBS_NS)
    cluster.kubectl("label", "namespace", JOBS_NS, "pod-security.kubernetes.io/enforce=restricted")
    cluster.kubectl("annotate", "namespace", JOBS_NS, f"{SECRETS_ANNOTATION}={EXAMPLE_SECRET}")
    done = subprocess.run(
        [str(cluster.bin / "helm"), "install", RELEASE, str(CHART), "--namespace", SYSTEM_NS, "--create-namespace",
         *HELM_VALUES],
        capture_output=True, text=True, env=cluster.env(), timeout=180, check=False)
    assert done.returncode == 0, f"helm install failed:\n{done.stdout}\n{done.stderr}"
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/diffusionjobs.stadi.dev", "crd/gpunodes.stadi.dev")
    return done.stdout


def chart_security_env(cluster: DevCluster) -> dict[str, str]:
    """The security settings the chart gives the operator Deployment with the release's values."""
    rendered = subprocess.run(
        [str(cluster.bin / "helm"), "template", RELEASE, str(CHART), "--namespace", SYSTEM_NS, *HELM_VALUES,
         "--set", "operator.enabled=true", "--show-only", "templates/operator-deployment.yaml"],
        capture_output=True, text=True, env=cluster.env(), timeout=120, check=True).stdout
    env = yaml.safe_load(rendered)["spec"]["template"]["spec"]["containers"][0]["env"]
    wanted = {f"STADI_OPERATOR_{name}" for name in SECURITY_SETTINGS}
    found = {item["name"]: item["value"] for item in env if item["name"] in wanted}
    assert set(found) == wanted, found
    return found


def start_operator(cluster: DevCluster, workdir: Path) -> tuple[subprocess.Popen[bytes], Path, Path, int, int]:
    """``stadi operator --namespace stadi-jobs`` as the chart's ServiceAccount (TokenRequest token); returns the
    process, its log, its kubeconfig, its liveness and its metrics port."""
    kubeconfig = cluster.sa_kubeconfig(OPERATOR_SA, SYSTEM_NS, path=workdir / "operator.kubeconfig")
    log = workdir / "operator.log"
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "STADI_OPERATOR_"))}
    env.update({
        "KUBECONFIG": str(kubeconfig),
        "STADI_OPERATOR_RECONCILE_INTERVAL": "1",
        "STADI_OPERATOR_UNSCHEDULABLE_TIMEOUT": "30",
        "STADI_OPERATOR_RETRY_BACKOFF": "2",
        "STADI_OPERATOR_VOLCANO": "off",
        "STADI_OPERATOR_METRICS_PORT": str(metrics_port),
        "STADI_OPERATOR_WORKER_IMAGE": WORKER_IMAGE,
        "PYTHONUNBUFFERED": "1",
        **chart_security_env(cluster),
    })
    with log.open("ab") as out:
        proc = subprocess.Popen([*OPERATOR_COMMAND, "--namespace", JOBS_NS, "--liveness", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)

    def healthy() -> bool:
        assert proc.poll() is None, f"operator exited:\n{log.read_text(errors='replace')[-4000:]}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)

    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError):
            if healthy():
                break
        if time.monotonic() > deadline:
            stop_process(proc)
            raise AssertionError(f"operator not healthy after 60 s:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.3)
    return proc, log, kubeconfig, port, metrics_port


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@pytest.fixture(scope="session", name="stadi")
def stadi_fixture(request: pytest.FixtureRequest, dev_cluster: DevCluster,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stadi]:
    """The release and the operator, once per session (shared by every module that imports this fixture)."""
    existing = request.config.stash.get(_STASH, None)
    if existing is not None:
        yield existing
        return
    install_output = helm_install(dev_cluster)
    workdir = tmp_path_factory.mktemp("stadi-operator")
    proc, log, kubeconfig, port, metrics_port = start_operator(dev_cluster, workdir)
    release = Stadi(dev_cluster, proc, log, kubeconfig, port, metrics_port, install_output)
    request.config.stash[_STASH] = release
    try:
        yield release
    finally:
        del request.config.stash[_STASH]
        stop_process(proc)
        print(f"--- operator log (tail)\n{release.operator_log_tail(40)}")
        release.helm("uninstall", RELEASE, "--namespace", SYSTEM_NS, check=False)
        for ns in (JOBS_NS, SYSTEM_NS):
            dev_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# --- the chart itself --------------------------------------------------------------------------------------


def test_helm_install_deploys_the_release(stadi: Stadi) -> None:
    status = stadi.helm("status", RELEASE, "--namespace", SYSTEM_NS).stdout
    assert "STATUS: deployed" in status
    notes = stadi.helm("get", "notes", RELEASE, "--namespace", SYSTEM_NS).stdout
    assert f"kubectl -n {JOBS_NS} apply -f manifests/examples/sdxl.yaml" in notes
    assert "get dj --watch" in notes
    assert "operator.enabled=false" in notes
    # The operator Deployment is left out, its identity and rights are not.
    assert stadi.kubectl("get", "deployments", "-n", SYSTEM_NS, "-o", "name").stdout.strip() == ""
    for sa in (OPERATOR_SA, AGENT_SA):
        stadi.kubectl("get", "serviceaccount", sa, "-n", SYSTEM_NS)
    stadi.kubectl("get", "role", "stadi-operator", "-n", JOBS_NS)
    stadi.kubectl("get", "rolebinding", "stadi-operator", "-n", JOBS_NS)
    for name in ("stadi-operator-inventory", "stadi-agent"):
        stadi.kubectl("get", "clusterrole", name)
        stadi.kubectl("get", "clusterrolebinding", name)
    # Namespaced mode: no cluster-wide ClusterRole over jobs and pods.
    assert stadi.kubectl("get", "clusterrole", "stadi-operator", check=False).returncode != 0


def test_crds_installed_with_printer_columns(stadi: Stadi) -> None:
    crd = stadi.cluster.kubectl_json("get", "crd", "diffusionjobs.stadi.dev")
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Phase", "Model", "GPUs", "Strategy", "Progress", "Predicted", "Age", "Nodes", "Speedup"]
    assert crd["spec"]["names"]["shortNames"] == ["dj"]
    stadi.kubectl("get", "crd", "gpunodes.stadi.dev")
    # Listing works through the short name and the category.
    stadi.kubectl("get", "dj", "-n", JOBS_NS)
    stadi.kubectl("get", "stadi", "-n", JOBS_NS)


def _agent_pods(stadi: Stadi) -> dict[str, dict[str, Any]]:
    pods = stadi.cluster.kubectl_json("get", "pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=agent")
    return {p["spec"].get("nodeName", ""): p for p in pods["items"]}


def test_agent_daemonset_runs_on_every_gpu_node_only(stadi: Stadi) -> None:
    gpu_nodes = {n.name for n in DEFAULT_NODES}
    cpu_node = GPUNodeSpec("cpu-only-0", "unused", 0, 0).manifest()
    labels = cpu_node["metadata"]["labels"]
    for key in [k for k in labels if k.startswith("nvidia.com/")]:
        del labels[key]
    cpu_node["status"]["capacity"].pop("nvidia.com/gpu")
    cpu_node["status"]["allocatable"].pop("nvidia.com/gpu")
    stadi.cluster.apply(cpu_node)
    try:
        stadi.cluster.wait_for(lambda: set(_agent_pods(stadi)) == gpu_nodes and all(
            p["status"].get("phase") == "Running" for p in _agent_pods(stadi).values()), 60,
            "one Running agent pod per GPU node")
        stadi.cluster.wait_for(lambda: stadi.kubectl(
            "get", "node", "cpu-only-0", "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
        ).stdout == "True", 30, "the CPU node Ready")
        time.sleep(2)  # give the DaemonSet controller time to (wrongly) place a pod on it
        assert "cpu-only-0" not in _agent_pods(stadi)
        ds = stadi.cluster.kubectl_json("get", "daemonset", "stadi-agent", "-n", SYSTEM_NS)
        assert ds["status"]["desiredNumberScheduled"] == len(gpu_nodes)
        pod = next(iter(_agent_pods(stadi).values()))
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert "nvidia.com/gpu" not in str(container.get("resources"))
        assert pod["spec"]["serviceAccountName"] == AGENT_SA
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    finally:
        stadi.kubectl("delete", "node", "cpu-only-0", "--wait=false", check=False)


def test_operator_runs_with_the_chart_service_account(stadi: Stadi) -> None:
    stadi.assert_operator_alive()
    who = stadi.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}",
                        kubeconfig=stadi.operator_kubeconfig).stdout
    assert who == f"system:serviceaccount:{SYSTEM_NS}:{OPERATOR_SA}"
    with urllib.request.urlopen(f"http://127.0.0.1:{stadi.liveness_port}/healthz", timeout=5) as response:
        assert response.status == 200
    assert not stadi.forbidden_in_operator_log(), "\n".join(stadi.forbidden_in_operator_log())
