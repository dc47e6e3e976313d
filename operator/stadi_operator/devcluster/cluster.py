"""A real Kubernetes control plane on loopback with kwok's fake GPU nodes: :class:`DevCluster`.

Processes: etcd, kube-apiserver (TLS with a CA made here, client-certificate users, ``Node,RBAC``
authorization, service-account token signing), kube-controller-manager (all controllers, each with its own
service account: token controller, garbage collector, namespace deletion, …), kube-scheduler and kwok (the
fake nodes of :mod:`.nodes` and the pod Stages of ``stages.yaml``). No kubelet, no container runtime, no
network: pods are bound by the real scheduler and their status is written by kwok. Opt-in (``kueue=True``): the
Kueue manager with its CRDs, from :func:`.testbin.prepare_kueue`.

Typical use (the e2e fixture in ``tests/e2e/conftest.py`` does exactly this)::

    cluster = DevCluster()          # binaries from testbin.prepare(), state in a temp dir
    cluster.start()                 # ~10 s warm; idempotent stop() is also registered with atexit
    cluster.kubectl("get", "nodes")
    cluster.apply(yaml_text_or_dict)
    token = cluster.token("stadi-operator", "stadi-system")       # TokenRequest API
    kubeconfig = cluster.sa_kubeconfig("stadi-operator", "stadi-system")
    cluster.stop()
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stadi_operator.devcluster import nodes as fake_nodes
from stadi_operator.devcluster import testbin

STAGES = Path(__file__).with_name("stages.yaml")
REPO_CRDS = Path(__file__).resolve().parents[3] / "manifests" / "crds"
SERVICE_CIDR = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kueue")
KUEUE_NAMESPACE = "kueue-system"
KUEUE_WEBHOOK_SERVICE = "kueue-webhook-service"  # Kueue's defaults: its cert rotator checks the cert against them
KUEUE_WEBHOOK_SECRET = "kueue-webhook-server-cert"
# The CRDs whose conversion webhook Kueue's cert rotator injects its CA into (Kueue's kustomize patches give them
# one); the manager never gets ready unless every one of them has a conversion webhook.
KUEUE_CONVERSION_CRDS = ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters")

Log = Callable[[str], None]


class ClusterError(RuntimeError):
    """The control plane did not come up; the message carries the tail of the failing component's log."""


class KubectlError(subprocess.CalledProcessError):
    """A failed ``kubectl``: its message carries kubectl's stderr (``.stderr`` too)."""

    def __str__(self) -> str:
        args = " ".join(str(a) for a in self.cmd[2:])
        return f"kubectl {args} exited {self.returncode}: {(self.stderr or '').strip()}"


def free_port() -> int:
    """A port that was free a moment ago (start() retries with new ports if one is taken in between)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
CA_EXT = ("-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")


def _issue_cert(d: Path, name: str, subj: str, usage: str, san: str | None, key: tuple[str, ...] = EC_KEY,
                ca: str = "ca") -> None:
    """``<name>.key`` and ``<name>.crt`` in ``d``, signed by ``<ca>.crt``/``<ca>.key`` there."""
    ext = [f"extendedKeyUsage={usage}", "keyUsage=critical,digitalSignature,keyEncipherment",
           "basicConstraints=CA:FALSE"]
    if san:
        ext.append(f"subjectAltName={san}")
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "3650", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=d)


def make_pki(d: Path) -> None:
    """CA, apiserver serving cert, client certs (admin in system:masters, controller-manager, scheduler) and the
    service-account signing key, all EC P-256 (fast to generate: a fresh set per cluster)."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *EC_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
             "-subj", "/CN=stadi-dev-ca", *CA_EXT, cwd=d)
    sans = ("IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")
    certs = {
        "apiserver": ("/CN=kube-apiserver", "serverAuth", sans),
        "admin": ("/O=system:masters/CN=stadi-admin", "clientAuth", None),
        "controller-manager": ("/CN=system:kube-controller-manager", "clientAuth", None),
        "scheduler": ("/CN=system:kube-scheduler", "clientAuth", None),
    }
    for name, (subj, usage, san) in certs.items():
        _issue_cert(d, name, subj, usage, san)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=d)
    _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def make_kueue_pki(d: Path) -> None:
    """Kueue's webhook CA and serving cert in the form its cert rotator keeps as they are (what it would generate
    instead only reaches the manager through a kubelet's Secret mount): a PKCS#1 RSA CA key, a CA with the DNS name
    ``kueue-ca``, a serving cert for the webhook Service's name and for 127.0.0.1 (what the API server dials)."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("genrsa", "-traditional", "-out", "kueue-ca.key", "2048", cwd=d)
    _openssl("req", "-x509", "-new", "-key", "kueue-ca.key", "-out", "kueue-ca.crt", "-days", "3650",
             "-subj", "/O=kueue/CN=kueue-ca", "-addext", "subjectAltName=DNS:kueue-ca", *CA_EXT, cwd=d)
    _issue_cert(d, "kueue-webhook", f"/CN={KUEUE_WEBHOOK_SERVICE}.{KUEUE_NAMESPACE}.svc", "serverAuth",
                f"DNS:{KUEUE_WEBHOOK_SERVICE}.{KUEUE_NAMESPACE}.svc,IP:127.0.0.1",
                key=("-newkey", "rsa:2048", "-nodes"), ca="kueue-ca")


def kueue_webhooks(manifests: str, port: int, ca: bytes) -> list[dict[str, Any]]:
    """Kueue's admission webhook configurations (its ``manifests.yaml``), kept to those of Kueue's own kinds
    (Workloads, queues, flavors: the job and pod integrations are off, and a webhook of theirs would answer 404
    and refuse every pod), named as Kueue's install names them (its cert rotator keeps their CA), and pointed at
    the manager on loopback instead of its Service."""
    configs = []
    for config in yaml.safe_load_all(manifests):
        hooks = [hook for hook in config.get("webhooks") or []
                 if all(group == "kueue.x-k8s.io" for rule in hook.get("rules", []) for group in rule["apiGroups"])]
        for hook in hooks:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": base64.b64encode(ca).decode()}
        name = config["metadata"]["name"]
        configs.append({**config, "metadata": {"name": f"kueue-{name}"}, "webhooks": hooks})
    return configs


def kueue_config(*, webhook_port: int, cert_dir: Path, health_port: int, metrics_port: int) -> dict[str, Any]:
    """Kueue's Configuration for a manager outside the cluster: loopback ports, no leader election, only the
    batch/job integration (an empty list means Kueue's default, which is the same), and no visibility server
    (it would write self-signed certs to ``/visibility``)."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "internalCertManagement": {"enable": True, "webhookServiceName": KUEUE_WEBHOOK_SERVICE,
                                   "webhookSecretName": KUEUE_WEBHOOK_SECRET},
        "integrations": {"frameworks": ["batch/job"]},
        "featureGates": {"VisibilityOnDemand": False},
    }


def write_kubeconfig(path: Path, server: str, ca: Path, *, cert: Path | None = None, key: Path | None = None,
                     token: str | None = None, user: str = "user", namespace: str | None = None) -> Path:
    """A one-context kubeconfig (JSON, which every client reads as YAML) with file references."""
    creds: dict[str, str] = {}
    if cert and key:
        creds = {"client-certificate": str(cert), "client-key": str(key)}
    if token:
        creds = {"token": token}
    ctx: dict[str, str] = {"cluster": "stadi-dev", "user": user}
    if namespace:
        ctx["namespace"] = namespace
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "stadi-dev",
        "clusters": [{"name": "stadi-dev", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "stadi-dev", "context": ctx}],
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    path.chmod(0o600)
    return path


@dataclass
class DevCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok with fake GPU nodes.

    ``state_dir``: where certs, kubeconfigs, etcd data and logs go (default: a fresh temp dir, removed by
    :meth:`stop`). ``nodes``: the fake nodes created on start (``()`` for none). ``detach``: leave the processes
    running when this Python process exits (``stadi dev-cluster up``); otherwise :meth:`stop` runs at exit.
    ``kueue``: also install Kueue's CRDs and run its manager (binaries from :func:`.testbin.prepare_kueue`; no
    admission webhooks are registered, so Kueue's defaulting and validation webhooks do not run).

    Attributes after :meth:`start`: ``kubeconfig`` (admin, system:masters), ``server`` (https URL),
    ``ca_file``, ``bin`` (binary folder; ``bin / "helm"`` etc.), ``pids``.
    """

    state_dir: Path | None = None
    nodes: tuple[fake_nodes.GPUNodeSpec, ...] | list[fake_nodes.GPUNodeSpec] = fake_nodes.DEFAULT_NODES
    detach: bool = False
    crds: Path | None = None
    kueue: bool = False
    log: Log = field(default=lambda msg: None, repr=False)
    bin: Path = field(default_factory=testbin.testbin_dir)
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    _own_state: bool = field(default=False, repr=False)

    # ---- paths -------------------------------------------------------------------------------------------
    @property
    def pki(self) -> Path:
        return self._dir / "pki"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (client certificate in ``system:masters``)."""
        return self._dir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def logs(self) -> Path:
        return self._dir / "logs"

    @property
    def _dir(self) -> Path:
        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="stadi-devcluster-"))
            self._own_state = True
        return self.state_dir

    def env(self) -> dict[str, str]:
        """``os.environ`` with ``KUBECONFIG`` set to the admin kubeconfig and the binaries first on ``PATH``."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0, attempts: int = 3) -> DevCluster:
        """Start everything, wait for /readyz, the default ServiceAccount and the fake nodes Ready.

        Retries with fresh ports when a component dies early (a port taken between picking and binding).
        Raises :class:`ClusterError` with the failing component's log tail.
        """
        if not testbin.ready():
            raise ClusterError(f"test binaries missing in {testbin.testbin_dir()}: run `make testbin` "
                               "or `stadi dev-cluster prepare`")
        if self.kueue and not testbin.kueue_ready():
            raise ClusterError(f"Kueue missing in {testbin.kueue_dir()}: run `make testbin`")
        if not self.detach:
            atexit.register(self.stop)
        last: Exception | None = None
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout)
                return self
            except ClusterError as exc:
                last = exc
                self.log(f"start attempt {attempt} failed: {str(exc).splitlines()[0]}")
                self._terminate()
                if attempt < attempts:
                    shutil.rmtree(self._dir / "etcd", ignore_errors=True)
        assert last is not None
        raise last

    def _start_once(self, timeout: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        d = self._dir
        self.logs.mkdir(parents=True, exist_ok=True)
        if not (self.pki / "sa.key").exists():
            make_pki(self.pki)
        self.ports = {k: free_port() for k in ("etcd", "etcd-peer", "apiserver")}
        p = self.pki
        write_kubeconfig(self.kubeconfig, self.server, self.ca_file, cert=p / "admin.crt", key=p / "admin.key",
                         user="stadi-admin")
        kcm_cfg = write_kubeconfig(d / "controller-manager.kubeconfig", self.server, self.ca_file,
                                   cert=p / "controller-manager.crt", key=p / "controller-manager.key")
        sched_cfg = write_kubeconfig(d / "scheduler.kubeconfig", self.server, self.ca_file,
                                     cert=p / "scheduler.crt", key=p / "scheduler.key")
        etcd_url = f"http://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn("etcd", [
            "--name=dev", f"--data-dir={d / 'etcd'}", f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}", f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}", f"--initial-cluster=dev={peer_url}",
            "--log-level=warn", "--unsafe-no-fsync",  # a throwaway cluster: durability buys nothing
            "--quota-backend-bytes=4294967296",
        ])
        self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['apiserver']}",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}", "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={ISSUER}", f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true", "--profiling=false", "--v=0",
            # The only address is loopback, which Endpoints reject; in-cluster clients can't reach us anyway.
            "--endpoint-reconciler-type=none",
            # A request-header CA that signs no front proxy: components reading it stop logging its absence,
            # and nobody can authenticate through headers.
            f"--requestheader-client-ca-file={p / 'ca.crt'}", "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        ])
        self._wait(self._readyz, deadline, "kube-apiserver /readyz")
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={kcm_cfg}", f"--authentication-kubeconfig={kcm_cfg}",
            f"--authorization-kubeconfig={kcm_cfg}", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--controllers=*", "--use-service-account-credentials=true", "--leader-elect=false",
            f"--service-account-private-key-file={p / 'sa.key'}", f"--root-ca-file={p / 'ca.crt'}",
            f"--cluster-signing-cert-file={p / 'ca.crt'}", f"--cluster-signing-key-file={p / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false", "--v=0",
        ])
        self._spawn("kube-scheduler", [
            f"--kubeconfig={sched_cfg}", f"--authentication-kubeconfig={sched_cfg}",
            f"--authorization-kubeconfig={sched_cfg}", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--leader-elect=false", "--profiling=false", "--v=0",
        ])
        self._spawn("kwok", [
            f"--kubeconfig={self.kubeconfig}", f"--config={STAGES}", "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector={}={}".format(*fake_nodes.KWOK_ANNOTATION),
            "--cidr=10.244.0.1/16", "--node-ip=10.240.0.1",
        ])
        # Pods can only be created once the token controller has made the namespace's default ServiceAccount.
        self._wait(lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default",
                                        check=False).returncode == 0, deadline, "ServiceAccount default/default")
        if self.crds:
            self.kubectl("apply", "--server-side", "-f", str(self.crds))
        if self.nodes:
            self.apply(fake_nodes.node_list(self.nodes))
            if any(n.dra for n in self.nodes):  # what NVIDIA's DRA driver would publish for them
                self.apply(fake_nodes.dra_objects(list(self.nodes)))
            names = [n.name for n in self.nodes]
            self._wait(lambda: self._nodes_ready(names), deadline, f"{len(names)} fake nodes Ready")
        if self.crds:
            self.kubectl("wait", "--for=condition=Established", "--timeout=30s", "-f", str(self.crds))
        if self.kueue:
            self._start_kueue(deadline)
        self._write_state()
        self.log(f"control plane up in {time.monotonic() - t0:.1f}s: {self.server}")

    def _apply_kueue_crds(self, webhook_port: int) -> None:
        """Kueue's CRDs, with the conversion webhooks its kustomize patches add pointed at the manager on loopback
        (server-side apply: the Workload CRD is too big for kubectl's last-applied annotation)."""
        crds = testbin.kueue_dir() / "crds"
        self.kubectl("apply", "--server-side", "-f", str(crds))
        conversion = {"spec": {"conversion": {"strategy": "Webhook", "webhook": {
            "clientConfig": {"url": f"https://127.0.0.1:{webhook_port}/convert"},
            "conversionReviewVersions": ["v1"]}}}}
        for crd in KUEUE_CONVERSION_CRDS:
            self.kubectl("patch", "crd", f"{crd}.kueue.x-k8s.io", "--type=merge", "-p", json.dumps(conversion))
        self.kubectl("wait", "--for=condition=Established", "--timeout=30s", "-f", str(crds))

    def _start_kueue(self, deadline: float) -> None:
        """Kueue's CRDs, namespace and webhook Secret, then the manager with the admin kubeconfig; waits for its
        /readyz (certificates in place, webhook server listening)."""
        d = self._dir / "kueue"
        ports = {"kueue-webhook": free_port(), "kueue-health": free_port(), "kueue-metrics": free_port()}
        self.ports.update(ports)
        self._apply_kueue_crds(ports["kueue-webhook"])
        if not (d / "kueue-webhook.crt").exists():
            make_kueue_pki(d)
        # The serving cert where a kubelet would mount the Secret: Kueue's rotator waits for the file.
        cert_dir = d / "serving-certs"
        cert_dir.mkdir(exist_ok=True)
        shutil.copyfile(d / "kueue-webhook.crt", cert_dir / "tls.crt")
        shutil.copyfile(d / "kueue-webhook.key", cert_dir / "tls.key")
        files = {"ca.crt": "kueue-ca.crt", "ca.key": "kueue-ca.key", "tls.crt": "kueue-webhook.crt",
                 "tls.key": "kueue-webhook.key"}
        self.apply([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KUEUE_NAMESPACE}},
            {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
             "metadata": {"name": KUEUE_WEBHOOK_SECRET, "namespace": KUEUE_NAMESPACE},
             "stringData": {k: (d / f).read_text() for k, f in files.items()}},
        ])
        config = d / "config.yaml"  # JSON is YAML
        config.write_text(json.dumps(kueue_config(webhook_port=ports["kueue-webhook"], cert_dir=cert_dir,
                                                  health_port=ports["kueue-health"],
                                                  metrics_port=ports["kueue-metrics"]), indent=2) + "\n")
        self._spawn("kueue", [f"--kubeconfig={self.kubeconfig}", f"--config={config}"],
                    exe=testbin.kueue_dir() / "kueue")
        self._wait(lambda: _http_ok(f"http://127.0.0.1:{ports['kueue-health']}/readyz"), deadline, "kueue /readyz")
        self.apply(kueue_webhooks((testbin.kueue_dir() / "webhooks.yaml").read_text(), ports["kueue-webhook"],
                                  (d / "kueue-ca.crt").read_bytes()))

    def _spawn(self, name: str, args: list[str], exe: Path | None = None) -> None:
        out = (self.logs / f"{name}.log").open("ab")
        # Own session = own process group: stop() kills the group, and ^C in a terminal does not reach it.
        # Attached clusters also die with this process even when it is SIGKILLed (no atexit then).
        proc = subprocess.Popen([str(exe or self.bin / name), *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self._dir,
                                preexec_fn=None if self.detach else _die_with_parent)
        out.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def _wait(self, probe: Callable[[], bool], deadline: float, what: str) -> None:
        delay = 0.05
        while True:
            self._check_alive()
            with contextlib.suppress(Exception):
                if probe():
                    return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}\n{self.log_tail(n, 15)}" for n in self._procs)
                raise ClusterError(f"timed out waiting for {what}\n{tails}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _readyz(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.server}/readyz", context=self._ssl(), timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _nodes_ready(self, names: list[str]) -> bool:
        out = self.kubectl("get", "nodes", "-o", "json").stdout
        ready = {
            n["metadata"]["name"] for n in json.loads(out)["items"]
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
        }
        return set(names) <= ready

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of one component's log (``etcd``, ``kube-apiserver``, …, ``kwok``)."""
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _write_state(self) -> None:
        state = {"pids": self.pids, "ports": self.ports, "server": self.server, "kubeconfig": str(self.kubeconfig),
                 "bin": str(self.bin)}
        (self._dir / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    def _terminate(self) -> None:
        # Reverse order: kwok and the controllers first, etcd last, so nobody logs errors about a dead etcd.
        for name in reversed(ORDER):
            pid = self.pids.pop(name, None)
            if pid is not None:
                kill_group(pid, self._procs.pop(name, None))
        self._procs.clear()

    def stop(self) -> None:
        """Stop every process (process groups: SIGTERM, then SIGKILL after 5 s) and remove an own temp dir.
        Idempotent; safe after a failed start."""
        self._terminate()
        if self._own_state and self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None
            self._own_state = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- helpers -----------------------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60,
                kubeconfig: Path | str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the cached kubectl against this cluster (admin unless ``kubeconfig``); text output captured.

        With ``check`` (default) a non-zero exit raises :class:`subprocess.CalledProcessError` whose message
        includes kubectl's stderr.
        """
        cmd = [str(self.bin / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise KubectlError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def kubectl_json(self, *args: str, **kw: Any) -> Any:
        """``kubectl ... -o json`` parsed."""
        return json.loads(self.kubectl(*args, "-o", "json", **kw).stdout)

    def apply(self, manifest: str | Mapping[str, Any] | Iterable[Mapping[str, Any]], *args: str,
              server_side: bool = False) -> str:
        """``kubectl apply -f -`` of YAML text, one object (dict) or several (list of dicts); returns stdout.
        Extra ``args`` go to kubectl (e.g. ``"-n", "ns"``)."""
        if isinstance(manifest, str):
            text = manifest
        elif isinstance(manifest, Mapping):
            text = json.dumps(manifest)
        else:
            text = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifest)})
        extra = ["--server-side", "--force-conflicts"] if server_side else []
        return self.kubectl("apply", *extra, "-f", "-", *args, input=text).stdout

    def token(self, service_account: str, namespace: str, duration: str = "24h") -> str:
        """A token for a ServiceAccount through the TokenRequest API (``kubectl create token``)."""
        return self.kubectl("create", "token", service_account, "-n", namespace,
                            f"--duration={duration}").stdout.strip()

    def sa_kubeconfig(self, service_account: str, namespace: str, path: Path | None = None,
                      duration: str = "24h") -> Path:
        """A kubeconfig that authenticates as ``system:serviceaccount:<namespace>:<service_account>`` (so a
        process run with it, e.g. the operator, gets exactly that account's RBAC). Default path:
        ``<state_dir>/sa-<namespace>-<name>.kubeconfig``."""
        path = path or self._dir / f"sa-{namespace}-{service_account}.kubeconfig"
        return write_kubeconfig(path, self.server, self.ca_file, token=self.token(service_account, namespace,
                                duration), user=f"{namespace}-{service_account}", namespace=namespace)

    def wait_for(self, probe: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
        """Poll ``probe`` until true (exceptions count as false); raises :class:`TimeoutError` with ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                if probe():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.2)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def kill_group(pid: int, proc: subprocess.Popen[bytes] | None = None, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``pid`` (a session leader started by :class:`DevCluster`), SIGKILL after
    ``grace`` seconds. Works from another process too (``stadi dev-cluster down``), where ``proc`` is None."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                break
        elif not _alive(pid):
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)


try:  # loaded in the parent: the child between fork and exec must not look libraries up
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG; else nothing)."""
    if _LIBC is not None and hasattr(_LIBC, "prctl"):
        _LIBC.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our child, not yet reaped) still answers kill(0): check its state.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True
