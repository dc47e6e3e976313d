"""``stadi agent``: the node agent (docs/architecture.md, "Control plane"), run by a DaemonSet on every GPU node.

Every few seconds it reads the node's GPUs through NVML, writes them into the status of the node's
cluster-scoped ``GPUNode`` (creating it once), and serves the same numbers as Prometheus gauges on
``/metrics``. Without NVML it reports zero GPUs and keeps running: a node whose driver is missing or
being upgraded must not crash-loop its agent.

kubernetes and prometheus_client are imported where they are used, so that ``stadi --help`` (which
imports this module to register the subcommand) stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from stadi.api import GROUP, VERSION, GpuNodeSpec, GpuNodeStatus, GpuTelemetry
from stadi_operator.nvml import THROTTLE_REASONS, NvmlSession, Reading, collect

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "Agent",
    "MetricsCollector",
    "Publisher",
    "add_parser",
    "collect",
    "gpunode_body",
    "kube_api",
    "node_status",
    "run_command",
    "serve_metrics",
]

log = logging.getLogger("stadi_operator.agent")

PLURAL = "gpunodes"
DEFAULT_INTERVAL = 5.0
DEFAULT_METRICS_PORT = 9400
DEFAULT_METRICS_ADDRESS = "0.0.0.0"  # the pod IP is what Prometheus scrapes
DEFAULT_NVML_RETRY = 60.0
# (connect, read) seconds: a hanging API server must not stall the loop (and /metrics freshness) forever.
REQUEST_TIMEOUT = (5.0, 15.0)
# While publishing keeps failing, repeat the warning this often rather than on every tick.
WARN_EVERY_SECONDS = 300.0
MIB = 1 << 20


def node_status(reading: Reading, now: datetime | None = None) -> GpuNodeStatus:
    """The GPUNode status for one reading."""
    message = reading.message
    if reading.nvml and not reading.gpus and not message:
        message = "NVML reports no GPUs"
    return GpuNodeStatus(
        gpus=reading.gpus,
        updated=(now or datetime.now(UTC)).replace(microsecond=0),
        nvml=reading.nvml,
        message=message,
    )


def gpunode_body(node_name: str) -> dict[str, Any]:
    """The GPUNode to create: metadata and spec, no status (the apiserver drops status on create)."""
    # Metadata by hand, not through stadi.api.Metadata (DNS labels only): node names are often DNS
    # subdomains (ip-10-0-0-1.ec2.internal), and so may a cluster-scoped object's name be.
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GPUNode",
        "metadata": {"name": node_name, "labels": {"app.kubernetes.io/managed-by": "stadi-agent"}},
        "spec": GpuNodeSpec(node_name=node_name).dump(),
    }


def _api_error(error: BaseException) -> str:
    """One line for an API failure: HTTP status and reason where the client gives them."""
    status = getattr(error, "status", None)
    reason = getattr(error, "reason", None)
    if status:  # ApiException; status 0 means the client itself gave up (SSL, bad request)
        return f"{status} {reason or ''}".strip()
    return str(reason or error) or type(error).__name__


class Publisher:
    """Writes one node's GPUNode: created once, then only its status subresource is patched.

    ``api`` is a ``kubernetes.client.CustomObjectsApi`` (or anything with its two methods). Errors
    propagate to the caller, which decides how loudly to log them.
    """

    def __init__(self, api: Any, node_name: str, *, timeout: tuple[float, float] = REQUEST_TIMEOUT) -> None:
        self.api = api
        self.node_name = node_name
        self._timeout = timeout
        self._exists = False  # known to exist: skip the create on later ticks

    def ensure(self) -> None:
        """Create the GPUNode unless it exists (a 409 from the create says it does)."""
        try:
            self.api.create_cluster_custom_object(GROUP, VERSION, PLURAL, gpunode_body(self.node_name),
                                                  _request_timeout=self._timeout)
            log.info("GPUNode created", extra={"node": self.node_name})
        except Exception as error:
            if getattr(error, "status", None) != 409:
                raise
        self._exists = True

    def publish(self, status: GpuNodeStatus) -> None:
        """Create the GPUNode if needed, then merge-patch its status."""
        if not self._exists:
            self.ensure()
        # status.learned is the operator's (speeds finished jobs measured): a merge patch without it keeps it
        patch = {"status": {k: v for k, v in status.dump().items() if k != "learned"}}
        try:
            self._patch(patch)
        except Exception as error:
            if getattr(error, "status", None) != 404:
                raise
            # Deleted under us (kubectl delete gpunode, or a cleanup): create it again, once per tick.
            self._exists = False
            self.ensure()
            self._patch(patch)

    def _patch(self, patch: dict[str, Any]) -> None:
        self.api.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, self.node_name, patch,
                                                    _request_timeout=self._timeout)


class MetricsCollector:
    """A Prometheus collector rendering the latest reading: a GPU that disappears takes its series with it.

    Register it in a ``CollectorRegistry`` of your own (never the process-wide default one), so that
    several agents can live in one test process.
    """

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        # Replaced whole by update() and read whole by the HTTP thread: no lock needed.
        self._reading = Reading()
        self._publish_errors = 0

    def update(self, reading: Reading) -> None:
        """Serve ``reading`` from now on."""
        self._reading = reading

    def count_publish_error(self) -> None:
        """One more failed publish."""
        self._publish_errors += 1

    def describe(self) -> Iterator[Any]:
        """The metric families without samples (lets the registry check names without collecting)."""
        return self._families(Reading(), 0, samples=False)

    def collect(self) -> Iterator[Any]:
        """The metric families of the latest reading."""
        return self._families(self._reading, self._publish_errors)

    def _families(self, reading: Reading, publish_errors: int, *, samples: bool = True) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["node", "index", "uuid", "product"]

        def gauge(name: str, doc: str, value: Callable[[GpuTelemetry], float]) -> Any:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for gpu in reading.gpus:
                family.add_metric(self._labels(gpu), value(gpu))
            return family

        yield gauge("stadi_gpu_utilization_ratio", "Fraction of time a kernel ran on the GPU (NVML).",
                    lambda gpu: gpu.utilization)
        yield gauge("stadi_gpu_memory_used_bytes", "GPU memory in use.", lambda gpu: gpu.memory_used_mib * MIB)
        yield gauge("stadi_gpu_memory_total_bytes", "GPU memory in total.", lambda gpu: gpu.memory_total_mib * MIB)
        yield gauge("stadi_gpu_sm_clock_hertz", "Current SM clock.", lambda gpu: gpu.sm_clock_mhz * 1e6)
        yield gauge("stadi_gpu_processes", "Compute processes running on the GPU.", lambda gpu: gpu.process_count)

        throttled = GaugeMetricFamily(
            "stadi_gpu_throttled",
            "1 while NVML reports this clock event (throttle) reason, else 0. GpuIdle and "
            "ApplicationsClocksSetting are not slowdowns.",
            labels=[*labels, "reason"],
        )
        for gpu in reading.gpus:
            active = set(gpu.throttle_reasons)
            names = [name for _, name in THROTTLE_REASONS]
            for reason in [*names, *sorted(active - set(names))]:  # unknown bits too, while present
                throttled.add_metric([*self._labels(gpu), reason], 1.0 if reason in active else 0.0)
        yield throttled

        up = GaugeMetricFamily("stadi_agent_nvml_up", "1 when NVML answered on the last read.", labels=["node"])
        gpus = GaugeMetricFamily("stadi_agent_gpus", "GPUs seen on the last read.", labels=["node"])
        errors = CounterMetricFamily("stadi_agent_publish_errors", "GPUNode status updates that failed.",
                                     labels=["node"])
        if samples:
            up.add_metric([self.node_name], 1.0 if reading.nvml else 0.0)
            gpus.add_metric([self.node_name], float(len(reading.gpus)))
            errors.add_metric([self.node_name], float(publish_errors))
        yield from (up, gpus, errors)

    def _labels(self, gpu: GpuTelemetry) -> list[str]:
        return [self.node_name, str(gpu.index), gpu.uuid, gpu.product]


def serve_metrics(registry: CollectorRegistry, port: int, address: str = DEFAULT_METRICS_ADDRESS) -> Any:
    """Serve ``/metrics`` from ``registry`` in a daemon thread; returns the server (``server_address``
    has the bound port, which matters for port 0; ``shutdown()`` and ``server_close()`` stop it)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server


class Agent:
    """Reads the GPUs, updates the metrics, and publishes the GPUNode status, one tick at a time.

    ``nvml``: the pynvml module, a fake with its function names, or an ``NvmlSession``; None imports
    pynvml on first use. ``publisher``: None only reads and serves metrics (``--dry-run``).
    """

    def __init__(
        self,
        node_name: str,
        *,
        nvml: Any | None = None,
        publisher: Publisher | None = None,
        interval: float = DEFAULT_INTERVAL,
        nvml_retry: float = DEFAULT_NVML_RETRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from prometheus_client import CollectorRegistry

        self.node_name = node_name
        self.session = nvml if isinstance(nvml, NvmlSession) else NvmlSession(nvml, retry_seconds=nvml_retry,
                                                                              clock=clock)
        self.publisher = publisher
        self.interval = interval
        self._clock = clock
        self.metrics = MetricsCollector(node_name)
        self.registry = CollectorRegistry()
        self.registry.register(self.metrics)  # type: ignore[arg-type]  # duck-typed Collector
        self.last_status: GpuNodeStatus | None = None
        self.last_publish_ok = False
        self._failures = 0  # consecutive failed publishes
        self._last_warning = 0.0

    def tick(self) -> GpuNodeStatus:
        """One read and one publish; never raises for NVML or API trouble."""
        reading = self.session.read()
        self.metrics.update(reading)
        status = node_status(reading)
        self.last_status = status
        if self.publisher is not None:
            self.last_publish_ok = self._publish(status)
        return status

    def _publish(self, status: GpuNodeStatus) -> bool:
        assert self.publisher is not None
        try:
            self.publisher.publish(status)
        except Exception as error:
            # Transient (apiserver restart, network, throttling) or not (RBAC): either way the next tick
            # tries again; warn on the first failure of a run of them and then every few minutes.
            self._failures += 1
            self.metrics.count_publish_error()
            now = self._clock()
            fields = {"node": self.node_name, "error": _api_error(error), "failures": self._failures}
            if self._failures == 1 or now - self._last_warning >= WARN_EVERY_SECONDS:
                self._last_warning = now
                log.warning("GPUNode status update failed; retrying next tick", extra=fields)
            else:
                log.debug("GPUNode status update failed again", extra=fields)
            return False
        if self._failures:
            log.info("GPUNode status updates work again", extra={"node": self.node_name,
                                                                  "failures": self._failures})
            self._failures = 0
        return True

    def run(self, stop: threading.Event | None = None, *, ticks: int | None = None) -> None:
        """Tick every ``interval`` seconds until ``stop`` is set (or ``ticks`` ticks have run)."""
        stop = stop or threading.Event()
        done = 0
        next_at = self._clock()
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # a bug, not NVML or API trouble: keep the node reporting anyway
                log.exception("agent tick failed")
            done += 1
            if ticks is not None and done >= ticks:
                return
            next_at += self.interval
            delay = next_at - self._clock()
            if delay < 0:  # fell behind (slow API): carry on from now rather than burst
                next_at, delay = self._clock(), 0.0
            stop.wait(delay)

    def close(self) -> None:
        """Release NVML and the API client's connections."""
        self.session.close()
        api_client = getattr(getattr(self.publisher, "api", None), "api_client", None)
        if api_client is not None and hasattr(api_client, "close"):
            api_client.close()


def kube_api(kubeconfig: str | None = None) -> Any:
    """A CustomObjectsApi of the operator package's one client factory: the pod's service account, else
    ``kubeconfig`` / KUBECONFIG / ~/.kube/config."""
    from kubernetes import client

    from stadi_operator.kube import api_client

    return client.CustomObjectsApi(api_client(kubeconfig))


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``stadi agent``."""
    parser = subparsers.add_parser(
        "agent", help="node agent: NVML telemetry into the node's GPUNode status and Prometheus /metrics",
        description="Every --interval seconds read this node's GPUs through NVML, write them into the status "
        "of the cluster-scoped GPUNode named after the node (created if missing), and serve them on "
        "/metrics. Without NVML it reports zero GPUs and keeps running.",
    )
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                        help="the node (and GPUNode) name (default: env NODE_NAME, set from spec.nodeName "
                        "through the downward API)")
    parser.add_argument("--interval", type=_positive, default=DEFAULT_INTERVAL,
                        help=f"seconds between updates (default {DEFAULT_INTERVAL:g})")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                        help=f"Prometheus /metrics port (default {DEFAULT_METRICS_PORT})")
    parser.add_argument("--metrics-address", default=DEFAULT_METRICS_ADDRESS,
                        help=f"address /metrics binds to (default {DEFAULT_METRICS_ADDRESS}; '::' for IPv6)")
    parser.add_argument("--nvml-retry", type=_positive, default=DEFAULT_NVML_RETRY,
                        help=f"seconds between NVML init retries while it is missing (default "
                        f"{DEFAULT_NVML_RETRY:g})")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account, else "
                        "KUBECONFIG, else ~/.kube/config)")
    parser.add_argument("--once", action="store_true",
                        help="collect and publish once, then exit (1 if publishing failed); no /metrics")
    parser.add_argument("--dry-run", action="store_true",
                        help="do not touch the API: print the GPUNode as JSON on stdout (with --once) or only "
                        "serve /metrics")
    parser.set_defaults(func=run_command)
    return parser


def run_command(args: argparse.Namespace, *, nvml: Any | None = None, api: Any | None = None) -> int:
    """``stadi agent``; ``nvml`` and ``api`` replace pynvml and the kubeconfig-built client (tests)."""
    node_name = args.node_name or (os.uname().nodename if args.dry_run else None)
    if not node_name:
        print("stadi agent: no node name: pass --node-name or set NODE_NAME (downward API spec.nodeName)",
              file=sys.stderr)
        return 2

    publisher = None
    if not args.dry_run:
        try:
            publisher = Publisher(api if api is not None else kube_api(args.kubeconfig), node_name)
        except Exception as error:  # no kubeconfig, bad service account: a misconfiguration, fail loudly
            print(f"stadi agent: cannot configure the Kubernetes client: {error}", file=sys.stderr)
            return 1

    agent = Agent(node_name, nvml=nvml, publisher=publisher, interval=args.interval, nvml_retry=args.nvml_retry)
    try:
        if args.once:
            status = agent.tick()
            if args.dry_run:
                body = {**gpunode_body(node_name), "status": status.dump()}
                print(json.dumps(body, indent=2))
                return 0
            return 0 if agent.last_publish_ok else 1
        return _serve(agent, args)
    finally:
        agent.close()


def _serve(agent: Agent, args: argparse.Namespace) -> int:
    try:
        server = serve_metrics(agent.registry, args.metrics_port, args.metrics_address)
    except OSError as error:  # port taken, address not on this host
        print(f"stadi agent: cannot serve /metrics on {args.metrics_address}:{args.metrics_port}: {error}",
              file=sys.stderr)
        return 1
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # The kubelet sends SIGTERM on pod deletion: finish the tick, shut NVML down, exit 0.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    log.info("agent started", extra={"node": agent.node_name, "interval": agent.interval,
                                     "metrics": f"{args.metrics_address}:{server.server_address[1]}"})
    try:
        agent.run(stop)
    finally:
        server.shutdown()
        server.server_close()
    return 0
