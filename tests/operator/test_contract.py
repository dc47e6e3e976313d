"""Contract between the operator's pod specs and the worker: the pods' commands, run as local processes.

The operator's own code builds the children of a 2-rank job (two nodes with one GPU each, planned from the
inventory as the operator plans), and each worker pod's container command runs here as a process with the
pod's environment. Only what the kubelet and the cluster would provide is stood in for: the ConfigMap volume
(a temp dir), the Secret behind ``secretKeyRef`` (a dict), the cache volume (one temp dir), rank 0's
DNS name (loopback, by rewriting torchrun's ``--master-addr``), the ServiceAccount token and the API server
(an https server on loopback with its own CA that authorizes each request against the job's Role, records the
PATCH bodies and answers as the API would). The device plugin's ``CUDA_VISIBLE_DEVICES`` is empty: the ranks run on CPU.

The images and manifest.json must land in a moto S3 bucket, and rank 0's progress in the job's status.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from stadi_operator.controller import children as ch
from stadi_operator.controller import inventory

from stadi.api import load_job
from stadi.planner import plan_job
from tests import s3server
from tests.s3server import list_keys
from tests.tls import serve_tls

s3_endpoint, s3_bucket, s3_env = s3server.s3_endpoint, s3server.s3_bucket, s3server.s3_env

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
EXAMPLE = ROOT / "manifests" / "examples" / "tiny-sdxl.yaml"
NAMESPACE = "team-a"
TOKEN = "worker-sa-token"
SECRET = "s3-creds"
RUN_TIMEOUT_S = 240.0


def gpu_node(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                              "kubernetes.io/hostname": name}},
        "spec": {},
        "status": {"allocatable": {"nvidia.com/gpu": "1"}, "conditions": [{"type": "Ready", "status": "True"}]},
    }


class FakeApi:
    """The API server as rank 0's reporter meets it: bearer token, RBAC from the job's Role, merge patch of the
    status subresource applied to a stored status."""

    def __init__(self, role: dict[str, Any], directory: Path) -> None:
        self.role = role
        self.patches: list[dict[str, Any]] = []
        self.denied: list[str] = []
        self.status: dict[str, Any] = {"phase": "Running", "progress": {}}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:  # http.server dispatches on the method name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                code = api.handle("patch", self.path, self.headers, body)
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps({"status": api.status} if code == 200 else {"code": code}).encode())

            def do_GET(self) -> None:
                code = api.handle("get", self.path, self.headers, None)
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.ca_file = serve_tls(self.server, directory)  # the API server's CA, mounted beside the token
        self.address = ("127.0.0.1", str(self.server.server_address[1]))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def allowed(self, verb: str, path: str) -> bool:
        """The RBAC check of a namespaced request, against the job's Role only."""
        parts = path.strip("/").split("/")
        # apis/<group>/<version>/namespaces/<ns>/<resource>/<name>[/<subresource>]
        if len(parts) < 7 or parts[0] != "apis" or parts[3] != "namespaces" or parts[4] != NAMESPACE:
            return False
        group, resource, name = parts[1], "/".join([parts[5], *parts[7:8]]), parts[6]
        return any(group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
                   and name in rule.get("resourceNames", [name]) for rule in self.role["rules"])

    def handle(self, verb: str, path: str, headers: Any, body: dict[str, Any] | None) -> int:
        scheme, _, token = str(headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or token != TOKEN:
            return 401
        if not self.allowed(verb, path):
            self.denied.append(f"{verb} {path}")
            return 403
        if headers.get("Content-Type") != "application/merge-patch+json":
            return 415
        assert body is not None
        self.patches.append(body)
        self.status = merge(self.status, body.get("status") or {})
        return 200

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def pod_process_args(pod: dict[str, Any], config_dir: Path, port: int) -> list[str]:
    """The container command with the cluster's names replaced by this machine's."""
    args = []
    for arg in pod["spec"]["containers"][0]["command"]:
        if arg.startswith("--master-addr="):
            arg = "--master-addr=127.0.0.1"  # rank 0's DNS name under the headless Service
        elif arg.startswith("--master-port="):
            arg = f"--master-port={port}"
        elif arg.startswith(ch.CONFIG_DIR + "/"):
            arg = str(config_dir / arg.removeprefix(ch.CONFIG_DIR + "/"))
        args.append(arg)
    return args


def pod_process_env(pod: dict[str, Any], secret: dict[str, str], cache: Path, api: FakeApi,
                    token_file: Path) -> dict[str, str]:
    """The container env (secretKeyRef resolved) plus what the kubelet would add, nothing from the host's
    STADI_ or AWS_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STADI_", "AWS_"))}
    for item in pod["spec"]["containers"][0]["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET
            env[item["name"]] = secret[ref["key"]]
    assert env["STADI_CACHE"] == ch.CACHE_DIR
    env.update(
        STADI_CACHE=str(cache),  # the cache volume
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the image's PATH has stadi and torchrun
        CUDA_VISIBLE_DEVICES="",  # the device plugin's say: no GPU here
        KUBERNETES_SERVICE_HOST=api.address[0], KUBERNETES_SERVICE_PORT=api.address[1],  # the API's Service
        STADI_KUBE_TOKEN_FILE=str(token_file), STADI_KUBE_CA_FILE=str(api.ca_file),  # the mounted ServiceAccount
        AWS_CONFIG_FILE=str(cache / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(cache / "no-aws-creds"),
        OMP_NUM_THREADS="1", STADI_DIST_TIMEOUT_S="120",  # two ranks on a few cores; a dead peer fails fast
    )
    return env


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc): torchrun starts its ranks in sessions of their own, so
    killing torchrun's process group alone would leave them running."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Started processes, each in its own session; on the way out every one still running is stopped, with
    everything it started: SIGTERM (torchrun stops its ranks), then SIGKILL after a grace period."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        live = [p for p in procs if p.poll() is None]
        family = {p.pid: descendants(p.pid) for p in live}
        for proc in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for proc in live:
            for pid in [proc.pid, *family[proc.pid]]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_operator_pods_run_as_local_processes_write_s3_and_report_progress(
        s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    # The job as submitted: the example, with its output in S3 behind a credentials Secret.
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"]["namespace"] = NAMESPACE
    document["spec"]["output"] = {"uri": f"s3://{s3_bucket}/contract", "endpoint": s3_endpoint,
                                  "credentialsSecret": SECRET}
    job = load_job(document)
    owner = ch.Owner(job.metadata.name or "", NAMESPACE, "uid-contract")

    # Planned as the operator plans: free devices from the Node inventory, then the planner.
    nodes = [info for info in map(inventory.node_info, [gpu_node("gpu-a"), gpu_node("gpu-b")]) if info]
    devices = inventory.free_devices(nodes, {}, {}, now=datetime.now(UTC))
    plan = plan_job(job.spec, devices)
    assert plan.world_size == 2 and {r.node for r in plan.ranks} == {"gpu-a", "gpu-b"}

    objs = ch.children(owner, job.spec, plan, 1, ch.WorkerOptions(progress_interval=0.2))
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], []).append(obj)
    pods, config_map, role = by_kind["Pod"], by_kind["ConfigMap"][0], by_kind["Role"][0]
    assert len(pods) == 2

    config_dir = tmp_path / "etc-stadi"  # the ConfigMap volume
    config_dir.mkdir()
    for key, text in config_map["data"].items():
        (config_dir / key).write_text(text)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    api = FakeApi(role, tmp_path)
    port = s3server.free_port()
    logs = []
    try:
        with processes() as procs:
            # One cache for both pods (a node-local hostPath would do the same in a cluster): the tiny model is
            # built once, under the cache's lock, instead of twice on the test machine's few cores.
            cache = tmp_path / "cache"
            cache.mkdir()
            for i, pod in enumerate(pods):
                env = pod_process_env(pod, s3server.TEST_KEYS, cache, api, token_file)
                log_path = tmp_path / f"pod-{i}.log"
                logs.append(log_path)
                with open(log_path, "wb") as log_file:
                    procs.append(subprocess.Popen(
                        pod_process_args(pod, config_dir, port), env=env, cwd=tmp_path, start_new_session=True,
                        stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    break  # one pod failed: the other would wait for it until the collective timeout
                time.sleep(0.2)
            codes = [p.poll() for p in procs]
        if codes != [0, 0]:
            tails = "\n".join(f"--- pod {i} (exit {c})\n{p.read_text(errors='replace')[-4000:]}"
                              for i, (c, p) in enumerate(zip(codes, logs, strict=True)))
            pytest.fail(f"worker pods did not both succeed: {codes}\n{tails}")
    finally:
        api.close()

    keys = list_keys(s3_endpoint, s3_bucket, "contract/")
    assert keys == ["contract/image-0000.png", "contract/image-0001.png", "contract/manifest.json"]
    manifest = json.loads(s3server.client(s3_endpoint).get_object(
        Bucket=s3_bucket, Key="contract/manifest.json")["Body"].read())
    assert [r["rank"] for r in manifest["ranks"]] == [0, 1]
    assert manifest["plan"]["initial"]["strategy"] == plan.strategy

    # Rank 0 (and only through the Role's one permission) reported progress to the job's status.
    assert api.denied == []
    assert api.patches, "no progress PATCH reached the API"
    assert any(p["status"]["progress"]["imagesDone"] < 2 for p in api.patches)  # reported along the way
    assert api.status["progress"] == {"step": 8, "steps": 8, "imagesDone": 2, "imagesTotal": 2}
    assert api.status["progressText"] == "2/2 images"
    assert [m["rank"] for m in api.status["measured"]] == [0, 1]
    assert all(m["stepMs"] and m["medianMs"] > 0 for m in api.status["measured"])
    assert "measured" in api.patches[-1]["status"]
    touched = ["measured", "phase", "progress", "progressText"]
    final = manifest["plan"]["final"]
    if manifest["plan"]["replanned"]:  # the printer columns follow a re-plan that changed the plan
        touched += ["gpus", "strategy"]
        assert api.status["strategy"] == final["strategy"]
        assert api.status["gpus"] == sum(1 for r in final["ranks"] if not r.get("idle"))
    assert sorted(api.status) == sorted(touched)  # nothing else touched
