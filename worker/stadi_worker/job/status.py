"""Rank 0's progress into its DiffusionJob's status, through the job's ServiceAccount.

One JSON merge patch of the job's ``status`` subresource, through the official Kubernetes client, setting
``progress``, ``progressText``, once known ``measured``, and after a re-plan that changed the plan its
``strategy`` and ``gpus`` (those still computing). The job's Role allows exactly that (``patch`` of
``diffusionjobs/status`` for this job's name) and nothing else.

Progress is best-effort: it must never fail or slow a generation. The progress callable only records the
latest state under a lock; a daemon thread sends it, at most once per ``interval`` seconds, except that the
event that finishes an image ("image"), a re-plan ("replan") and the final one ("done") are sent as soon as the
thread is free. Errors are logged once (then at debug level) and never raised; a failed patch is retried with
the next one. Closing the reporter sends what is still pending, waiting a bounded time.

Enabled when the job's name and namespace are known (the operator sets ``STADI_JOB_NAME`` and
``STADI_JOB_NAMESPACE``). Authentication is the client library's: the pod's ServiceAccount (its token re-read
as the kubelet rotates it), or a kubeconfig for development and tests.

``measured`` comes from two places: a "replan" event (whatever of ``speeds``, ``median_ms``/``medians_ms``,
``step_ms`` it carries, each a per-rank list or a rank-keyed mapping, or ``measured``: a list of per-rank
records) and :meth:`StatusReporter.finish` with rank 0's manifest (every rank's step times and median).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from stadi.api import GROUP, VERSION

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_INTERVAL_S = 5.0
REQUEST_TIMEOUT_S = 5.0
FLUSH_TIMEOUT_S = 10.0  # how long closing may wait for the last patch: bounded, the job is already done
URGENT = frozenset({"image", "replan", "done"})
# status.measured lives in the job object (etcd, ~1.5 MB per object): per rank, the most recent step times
# only; the median covers all of them and the manifest keeps the full record.
MAX_STEP_MS = 64

Send = Callable[[dict[str, Any]], None]


def api_client(kubeconfig: Path | None = None, token_file: Path = SA_DIR / "token",
               ca_file: Path = SA_DIR / "ca.crt") -> Any:
    """A client of the API server: from ``kubeconfig`` when given, else the pod's ServiceAccount (the library
    re-reads the token as the kubelet rotates it). Raises the library's ConfigException when neither works."""
    from kubernetes import client, config
    from kubernetes.config.incluster_config import InClusterConfigLoader

    configuration = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    else:
        InClusterConfigLoader(token_filename=str(token_file), cert_filename=str(ca_file)).load_and_set(configuration)
    return client.ApiClient(configuration)


class KubeStatusClient:
    """Merge-patch the status subresource of one DiffusionJob."""

    def __init__(self, api: Any, namespace: str, name: str, timeout: float = REQUEST_TIMEOUT_S) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api)
        self.namespace, self.name, self.timeout = namespace, name, timeout
        self.url = (f"{api.configuration.host.rstrip('/')}/apis/{GROUP}/{VERSION}/namespaces/{namespace}"
                    f"/diffusionjobs/{name}/status")

    def __call__(self, body: dict[str, Any]) -> None:
        """Send one merge patch; raises OSError with the API's message when the API refuses it."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, "diffusionjobs", self.name, body,
                _content_type="application/merge-patch+json", _request_timeout=self.timeout)
        except ApiException as error:
            detail = ""
            with contextlib.suppress(Exception):
                detail = str(json.loads(error.body or "{}").get("message") or "")
            raise OSError(f"PATCH {self.url}: HTTP {error.status} {detail or error.reason}") from None


def _per_rank(values: Any) -> list[tuple[int, Any]]:
    """(rank, value) pairs of a per-rank list or a rank-keyed mapping; nothing for anything else."""
    if isinstance(values, Mapping):
        return [(int(rank), value) for rank, value in values.items()]
    if isinstance(values, Sequence) and not isinstance(values, str | bytes):
        return list(enumerate(values))
    return []


def _steps(values: Any) -> list[float]:
    return [round(float(t), 4) for t in list(values)[-MAX_STEP_MS:]]


def current_plan_of(event: Any) -> dict[str, Any]:
    """What a "replan" event that changed the plan says of it for the printer columns: its strategy and the
    GPUs still computing (an idle rank's rows are empty)."""
    if not getattr(event, "replanned", False) or getattr(event, "strategy", None) is None:
        return {}
    rows = getattr(event, "rows", None) or []
    return {"strategy": str(event.strategy), "gpus": sum(1 for r in rows if r[1] > r[0])}


def measurements_of(event: Any) -> dict[int, dict[str, Any]]:
    """The per-rank measurements a progress event carries (a "replan" event), as status.measured entries."""
    found: dict[int, dict[str, Any]] = {}

    def put(rank: int, key: str, value: Any) -> None:
        if value is not None:
            found.setdefault(rank, {"rank": rank})[key] = value

    for rank, speed in _per_rank(getattr(event, "speeds", None)):
        put(rank, "speed", None if speed is None else round(float(speed), 4))
    medians = getattr(event, "median_ms", None)
    for rank, median in _per_rank(medians if medians is not None else getattr(event, "medians_ms", None)):
        put(rank, "medianMs", None if median is None else round(float(median), 4))
    for rank, steps in _per_rank(getattr(event, "step_ms", None)):
        if isinstance(steps, Sequence):
            put(rank, "stepMs", _steps(steps))
    for record in getattr(event, "measured", None) or []:
        get = record.get if isinstance(record, Mapping) else (lambda key, r=record: getattr(r, key, None))
        rank = get("rank")
        if rank is None:
            continue
        steps = get("stepMs") if get("stepMs") is not None else get("step_ms")
        median = next((v for v in (get("medianMs"), get("median_ms"), get("median_step_ms")) if v is not None),
                      None)
        put(int(rank), "stepMs", None if steps is None else _steps(steps))
        put(int(rank), "medianMs", None if median is None else round(float(median), 4))
        put(int(rank), "speed", None if get("speed") is None else round(float(get("speed")), 4))
    return found


class StatusReporter:
    """A progress sink (``reporter(event)``) that keeps the job's status up to date, throttled.

    ``send`` delivers one merge-patch body (raising on failure). With ``background`` a daemon thread sends;
    without it (tests) sends happen inside the call, with the same throttling, and :meth:`close` flushes.
    """

    def __init__(self, send: Send, interval: float = DEFAULT_INTERVAL_S, *,
                 clock: Callable[[], float] = time.monotonic, background: bool = True,
                 flush_timeout: float = FLUSH_TIMEOUT_S) -> None:
        self._send = send
        self.interval = max(0.0, float(interval))
        self._clock = clock
        self._flush_timeout = flush_timeout
        self._cond = threading.Condition()
        self._progress: dict[str, Any] | None = None
        self._text = ""
        self._measured: dict[int, dict[str, Any]] = {}
        self._current: dict[str, Any] = {}  # the re-planned strategy and GPUs computing
        self._dirty = False  # state not yet delivered
        self._measured_dirty = False
        self._urgent = False
        self._last_sent: float | None = None
        self._closing = False
        self._warned = False
        self.sent = 0
        self.errors = 0
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="stadi-status", daemon=True)
            self._thread.start()

    # --- what the job runner calls ---

    def __call__(self, event: Any) -> None:
        """Record a ProgressEvent (never raises, never blocks on the network)."""
        try:
            with self._cond:
                self._progress = {"step": int(event.step), "steps": int(event.steps),
                                  "imagesDone": int(event.images_done), "imagesTotal": int(event.images_total)}
                self._text = f"{int(event.images_done)}/{int(event.images_total)} images"
                if event.kind == "replan":
                    self._merge(measurements_of(event))
                    self._current.update(current_plan_of(event))
                self._dirty = True
                self._urgent = self._urgent or event.kind in URGENT
                self._cond.notify()
            if self._thread is None:
                self._pump(force=False)
        except Exception as error:  # a malformed event must not end the generation
            self._warn(f"progress event not recorded: {error}")

    def finish(self, manifest: Any) -> None:
        """Publish every rank's step times and median (and the measured speeds, when the job profiled) from rank
        0's manifest (sent promptly)."""
        try:
            found = {
                r.rank: {"rank": r.rank, "stepMs": _steps(r.step_ms),
                         **({"medianMs": round(float(r.median_step_ms), 4)} if r.median_step_ms is not None else {})}
                for r in manifest.ranks
            }
            # The warmup profile's speeds, also when the "replan" event that carried them was not delivered.
            for rank, speed in _per_rank(getattr(getattr(manifest, "plan", None), "measured_speeds", None)):
                if speed is not None and rank in found:
                    found[rank]["speed"] = round(float(speed), 4)
            with self._cond:
                self._merge(found)
                self._dirty = self._urgent = True
                self._cond.notify()
            if self._thread is None:
                self._pump(force=False)
        except Exception as error:
            self._warn(f"measurements not recorded: {error}")

    def close(self) -> None:
        """Send what is pending and stop, waiting at most the flush timeout."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(self._flush_timeout)
            if self._thread.is_alive():
                log.debug("progress: last patch still in flight at exit")
        else:
            self._pump(force=True)

    # --- internals ---

    def _merge(self, found: Mapping[int, dict[str, Any]]) -> None:
        """Update per-rank entries field by field: a replan's speeds survive the manifest's step times."""
        for rank, fields in found.items():
            self._measured.setdefault(rank, {"rank": rank}).update(fields)
            self._measured_dirty = True

    def _due(self, now: float) -> bool:
        return self._dirty and (self._urgent or self._last_sent is None or now - self._last_sent >= self.interval)

    def _take(self, force: bool) -> tuple[dict[str, Any], bool] | None:
        """The patch to send now, if one is due (caller holds the lock)."""
        now = self._clock()
        if not (self._dirty and (force or self._due(now))):
            return None
        status: dict[str, Any] = {}
        if self._progress is not None:
            status["progress"] = dict(self._progress)
            status["progressText"] = self._text
        status.update(self._current)  # small and idempotent: in every patch, so a lost one is made good
        with_measured = self._measured_dirty
        if with_measured:
            # A merge patch replaces lists whole: always the complete, rank-ordered list.
            status["measured"] = [dict(self._measured[r]) for r in sorted(self._measured)]
        self._dirty = self._urgent = self._measured_dirty = False
        self._last_sent = now
        return {"status": status}, with_measured

    def _pump(self, force: bool) -> None:
        with self._cond:
            item = self._take(force)
        if item is not None:
            self._deliver(*item)

    def _deliver(self, body: dict[str, Any], with_measured: bool) -> None:
        try:
            self._send(body)
            self.sent += 1
        except Exception as error:
            self.errors += 1
            self._warn(f"job status not updated: {error}")
            with self._cond:
                # Retried with the next patch (throttled), not in a loop.
                self._dirty = True
                self._measured_dirty = self._measured_dirty or with_measured

    def _warn(self, message: str) -> None:
        if self._warned:
            log.debug(message)
            return
        self._warned = True
        log.warning(f"{message} (progress is best-effort; further errors are logged at debug level)")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._due(self._clock()):
                    wait = None
                    if self._dirty and self._last_sent is not None:
                        wait = max(0.01, self._last_sent + self.interval - self._clock())
                    self._cond.wait(wait)
                closing = self._closing
                item = self._take(force=closing)
            if item is not None:
                self._deliver(*item)
            if closing:
                return


def for_job(name: str | None, namespace: str | None, *, interval: float = DEFAULT_INTERVAL_S,
            kubeconfig: Path | None = None, token_file: Path = SA_DIR / "token",
            ca_file: Path = SA_DIR / "ca.crt") -> StatusReporter | None:
    """A reporter for the job ``namespace/name``, or None: not launched by the operator (no name), or no way
    to reach the API server (a warning says why; the job runs on without progress in its status)."""
    if not name or not namespace:
        return None  # not launched by the operator (stadi run, tests): nothing to report to
    if kubeconfig is None and not token_file.is_file():
        log.warning(f"progress is not reported to the job status: no ServiceAccount token at {token_file}")
        return None
    try:
        api = api_client(kubeconfig, token_file, ca_file)
    except Exception as error:  # a bad environment costs the progress, not the job
        log.warning(f"progress is not reported to the job status: {error}")
        return None
    return StatusReporter(KubeStatusClient(api, namespace, name), interval)


@contextlib.contextmanager
def reporting(make: Callable[[], StatusReporter | None] | None) -> Iterator[StatusReporter | None]:
    """The reporter ``make`` builds (None: no reporting), as a context: closed, i.e. flushed, on the way out."""
    reporter = make() if make is not None else None
    try:
        yield reporter
    finally:
        if reporter is not None:
            reporter.close()


def compose(*sinks: Callable[[Any], None] | None) -> Callable[[Any], None] | None:
    """One progress callable feeding every given sink in order; None when there is none."""
    present = [s for s in sinks if s is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def emit(event: Any) -> None:
        for sink in present:
            sink(event)

    return emit
