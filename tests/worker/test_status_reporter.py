"""Rank 0's status reporter: throttling, urgent and final events, errors, configuration, the HTTP request.

Policy tests run the reporter without its thread (sends happen inside the call) on a fake clock; one test
runs the thread, and one sends real PATCHes to an http.server on loopback.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from stadi_worker.job import status as sr
from stadi_worker.job.manifest import RankRecord
from stadi_worker.job.progress import ProgressEvent

from tests.tls import serve_tls


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A ``send`` that records bodies, optionally failing."""

    def __init__(self, fail: bool = False) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.fail = fail

    def __call__(self, body: dict[str, Any]) -> None:
        if self.fail:
            raise OSError("PATCH https://api/...: HTTP 403 forbidden")
        self.bodies.append(body)

    def progress(self) -> list[tuple[int, int]]:
        return [(b["status"]["progress"]["step"], b["status"]["progress"]["imagesDone"]) for b in self.bodies]


def step(n: int, done: int = 0, total: int = 2, steps: int = 10) -> ProgressEvent:
    return ProgressEvent("step", n, steps, done, total)


def image(done: int, total: int = 2, steps: int = 10) -> ProgressEvent:
    return ProgressEvent("image", steps, steps, done, total, uri=f"s3://b/image-{done - 1:04d}.png")


def sync_reporter(send: Recorder, interval: float = 5.0) -> tuple[sr.StatusReporter, Clock]:
    clock = Clock()
    return sr.StatusReporter(send, interval, clock=clock, background=False), clock


def test_steps_are_throttled_and_image_events_always_sent() -> None:
    send = Recorder()
    reporter, clock = sync_reporter(send, interval=5.0)
    reporter(ProgressEvent("start", 0, 10, 0, 2))  # the first event goes out at once
    for n in range(1, 5):
        clock.now += 1.0
        reporter(step(n))  # within the interval: coalesced
    assert send.progress() == [(0, 0)]
    clock.now += 1.5
    reporter(step(5))  # 5.5 s after the last patch
    clock.now += 0.1
    reporter(image(1))  # the last event of an image: not held back by the interval
    clock.now += 0.1
    reporter(step(1, done=1))
    assert send.progress() == [(0, 0), (5, 0), (10, 1)]
    assert send.bodies[-1] == {"status": {
        "progress": {"step": 10, "steps": 10, "imagesDone": 1, "imagesTotal": 2}, "progressText": "1/2 images"}}


def test_the_final_event_and_close_flush_what_is_pending() -> None:
    send = Recorder()
    reporter, clock = sync_reporter(send, interval=60.0)
    reporter(ProgressEvent("start", 0, 10, 0, 2))
    clock.now += 1
    reporter(step(3))
    clock.now += 1
    reporter(ProgressEvent("done", 10, 10, 2, 2, uri="s3://b/manifest.json"))
    assert send.progress() == [(0, 0), (10, 2)]
    assert send.bodies[-1]["status"]["progressText"] == "2/2 images"

    send2 = Recorder()
    reporter2, clock2 = sync_reporter(send2, interval=60.0)
    reporter2(ProgressEvent("start", 0, 10, 0, 2))
    clock2.now += 1
    reporter2(step(7))  # held by the interval ...
    reporter2.close()  # ... and sent on the way out (a failing job still shows how far it got)
    assert send2.progress() == [(0, 0), (7, 0)]
    reporter2.close()
    assert len(send2.bodies) == 2  # nothing new: nothing sent


def test_measurements_from_a_replan_and_from_the_manifest() -> None:
    send = Recorder()
    reporter, clock = sync_reporter(send, interval=60.0)
    reporter(ProgressEvent("start", 0, 10, 0, 1))

    @dataclass(frozen=True)
    class Replan:  # the shape a re-planning runner's event may take: per-rank lists
        kind: str = "replan"
        step: int = 2
        steps: int = 10
        images_done: int = 0
        images_total: int = 1
        speeds: list[float] = field(default_factory=lambda: [1.0, 0.333333])
        median_ms: list[float] = field(default_factory=lambda: [10.0, 30.0])

    clock.now += 1
    reporter(Replan())  # urgent: sent despite the interval
    assert send.bodies[-1]["status"]["measured"] == [{"rank": 0, "speed": 1.0, "medianMs": 10.0},
                                                     {"rank": 1, "speed": 0.3333, "medianMs": 30.0}]
    clock.now += 1
    reporter(step(5, total=1))
    assert len(send.bodies) == 2 or "measured" not in send.bodies[-1]["status"]  # sent once, not every patch

    @dataclass
    class Manifest:
        ranks: list[RankRecord]
        plan: Any = None

    ranks = [RankRecord.measure(0, "cpu", [10.0, 12.0, 11.0], "a"),
             RankRecord.measure(1, "cpu", [float(i) for i in range(200)], "b")]
    reporter.finish(Manifest(ranks))
    measured = send.bodies[-1]["status"]["measured"]
    assert measured[0] == {"rank": 0, "speed": 1.0, "medianMs": 11.0, "stepMs": [10.0, 12.0, 11.0]}
    assert measured[1]["speed"] == 0.3333  # the replan's speed survives the manifest's times
    assert measured[1]["medianMs"] == 99.5  # over all steps ...
    assert measured[1]["stepMs"] == [float(i) for i in range(200 - sr.MAX_STEP_MS, 200)]  # ... the last few kept


def test_speeds_from_the_manifest_when_the_replan_event_was_lost() -> None:
    send = Recorder()
    reporter, _ = sync_reporter(send)

    @dataclass
    class Manifest:
        ranks: list[RankRecord]
        plan: Any

    @dataclass
    class PlanRecord:
        measured_speeds: list[float] | None

    reporter.finish(Manifest([RankRecord.measure(0, "cpu", [5.0], "a"), RankRecord.measure(1, "cpu", [15.0], "b")],
                             PlanRecord([1.0, 0.5])))
    assert send.bodies[-1] == {"status": {"measured": [
        {"rank": 0, "stepMs": [5.0], "medianMs": 5.0, "speed": 1.0},
        {"rank": 1, "stepMs": [15.0], "medianMs": 15.0, "speed": 0.5}]}}


def test_errors_are_logged_once_never_raised_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    send = Recorder(fail=True)
    reporter, clock = sync_reporter(send, interval=1.0)
    with caplog.at_level(logging.DEBUG, logger="stadi_worker.job.status"):
        reporter(ProgressEvent("start", 0, 10, 0, 2))
        for n in range(1, 6):
            clock.now += 2
            reporter(step(n))
        reporter(ProgressEvent("bogus", "x", 10, 0, 2))  # type: ignore[arg-type]  # malformed: swallowed
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "HTTP 403" in warnings[0].getMessage()
    assert reporter.errors == 6 and reporter.sent == 0
    send.fail = False
    clock.now += 2
    reporter(step(6))  # the API is back: the latest state goes out
    assert send.progress() == [(6, 0)]


def test_background_thread_sends_without_blocking_the_caller() -> None:
    release = threading.Event()
    bodies: list[dict[str, Any]] = []

    def slow_send(body: dict[str, Any]) -> None:
        release.wait(5)  # an API that hangs must not hold up the generation
        bodies.append(body)

    reporter = sr.StatusReporter(slow_send, interval=0.05)
    t0 = time.perf_counter()
    reporter(ProgressEvent("start", 0, 10, 0, 2))
    for n in range(1, 50):
        reporter(step(n))
    reporter(ProgressEvent("done", 10, 10, 2, 2))
    assert time.perf_counter() - t0 < 0.5
    release.set()
    reporter.close()
    assert bodies[-1]["status"]["progress"] == {"step": 10, "steps": 10, "imagesDone": 2, "imagesTotal": 2}
    assert len(bodies) <= 2  # the first send hung; everything after it was coalesced into one patch


def test_close_waits_a_bounded_time_for_a_hanging_api() -> None:
    hang = threading.Event()
    reporter = sr.StatusReporter(lambda body: hang.wait(10) and None, interval=0.0, flush_timeout=0.2)
    reporter(ProgressEvent("start", 0, 10, 0, 2))
    t0 = time.perf_counter()
    reporter.close()
    assert time.perf_counter() - t0 < 2
    hang.set()


# --- configuration ----------------------------------------------------------------------------------------


@pytest.fixture
def kube_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A pod's view: the job named, the ServiceAccount's token and CA bundle mounted, the API's address."""
    token = tmp_path / "token"
    token.write_text("secret-token")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("STADI_JOB_NAME", "cats")
    monkeypatch.setenv("STADI_JOB_NAMESPACE", "team-a")
    monkeypatch.setenv("STADI_KUBE_TOKEN_FILE", str(token))
    monkeypatch.setenv("STADI_KUBE_CA_FILE", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "1")
    monkeypatch.setenv("STADI_PROGRESS_INTERVAL", "0.5")
    return token


def from_env() -> sr.StatusReporter | None:
    """The reporter a rank builds from its settings (the environment)."""
    from stadi_worker.cli.worker import status_reporter
    from stadi_worker.settings import WorkerSettings

    return status_reporter(WorkerSettings())


def test_disabled_without_job_or_token(kube_env: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    reporter = from_env()
    assert reporter is not None and reporter.interval == 0.5
    reporter.close()
    kube_env.unlink()
    with caplog.at_level(logging.WARNING, logger="stadi_worker.job.status"):
        assert from_env() is None
    assert "no ServiceAccount token" in caplog.text
    kube_env.write_text("t")
    monkeypatch.delenv("STADI_JOB_NAMESPACE")
    assert from_env() is None  # stadi run: no job object to report to
    with sr.reporting(None) as none:
        assert none is None


def test_in_cluster_defaults(kube_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    reporter = from_env()
    assert reporter is not None
    reporter.close()
    assert reporter._send.url == (  # type: ignore[attr-defined]
        "https://[fd00::1]:443/apis/stadi.dev/v1alpha1/namespaces/team-a/diffusionjobs/cats/status")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert from_env() is None


def test_compose() -> None:
    seen: list[str] = []
    assert sr.compose(None, None) is None
    one = seen.append
    assert sr.compose(None, one) is one
    both = sr.compose(lambda e: seen.append(f"a{e}"), lambda e: seen.append(f"b{e}"))
    assert both is not None
    both(1)
    assert seen == ["a1", "b1"]


# --- the HTTP request ---------------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[tuple[str, str], Path, list[dict[str, Any]]]]:
    """An API stand-in on loopback, over TLS with its own CA (as an API server in a cluster), recording
    PATCHes; answers 403 for any other job. Yields ((host, port), the CA file, what it saw)."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:  # http.server dispatches on the method name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                         "body": json.loads(body)})
            ok = self.path.endswith("/diffusionjobs/cats/status")
            reply = b"{}" if ok else json.dumps({"kind": "Status", "message": "forbidden: not your job"}).encode()
            self.send_response(200 if ok else 403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ca = serve_tls(server, tmp_path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ("127.0.0.1", str(server.server_address[1])), ca, seen
    finally:
        server.shutdown()
        server.server_close()


def test_client_sends_a_merge_patch_with_the_token(api: tuple[tuple[str, str], Path, list[dict[str, Any]]],
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a pod: the ServiceAccount's token over TLS to the API server, re-read by the client library as the
    kubelet rotates it (once its refresh period passes, made zero here)."""
    import datetime

    from kubernetes.config import incluster_config

    (host, port), ca, seen = api
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    monkeypatch.setattr(incluster_config, "datetime", type("clock", (), {
        "datetime": datetime.datetime, "timedelta": staticmethod(lambda **_: datetime.timedelta(0))}))
    token = tmp_path / "token"
    token.write_text("tok-1")
    client = sr.KubeStatusClient(sr.api_client(None, token, ca), "team-a", "cats")
    client({"status": {"progressText": "1/2 images"}})
    token.write_text("tok-2")  # rotated by the kubelet: the next request uses the new one
    client({"status": {"progressText": "2/2 images"}})
    assert [s["path"] for s in seen] == ["/apis/stadi.dev/v1alpha1/namespaces/team-a/diffusionjobs/cats/status"] * 2
    assert seen[0]["headers"]["content-type"] == "application/merge-patch+json"
    assert [s["headers"]["authorization"].lower() for s in seen] == ["bearer tok-1", "bearer tok-2"]
    assert seen[1]["body"] == {"status": {"progressText": "2/2 images"}}
    with pytest.raises(OSError, match="HTTP 403 forbidden: not your job"):
        sr.KubeStatusClient(sr.api_client(None, token, ca), "team-a", "dogs")({"status": {}})


def test_a_replan_that_changed_the_plan_sets_strategy_and_gpus() -> None:
    send = Recorder()
    reporter, clock = sync_reporter(send, interval=60.0)
    reporter(ProgressEvent("start", 0, 10, 0, 1))
    clock.now += 1
    reporter(ProgressEvent("replan", 2, 10, 0, 1, speeds=[1.0, 0.1], strategy="stadi", strides=[1, 1],
                           rows=[[0, 128], [0, 0]], replanned=False))
    assert "strategy" not in send.bodies[-1]["status"]  # unchanged: the operator's columns stand
    clock.now += 1
    reporter(ProgressEvent("replan", 2, 10, 0, 1, speeds=[1.0, 0.1], strategy="single", strides=[1, 1],
                           rows=[[0, 128], [0, 0]], replanned=True))
    assert (send.bodies[-1]["status"]["strategy"], send.bodies[-1]["status"]["gpus"]) == ("single", 1)
    clock.now += 61
    reporter(step(5, total=1))
    assert send.bodies[-1]["status"]["gpus"] == 1  # kept in later patches: a lost one is made good
