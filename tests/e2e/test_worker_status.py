"""The worker's real status reporter (``stadi_worker.job.status``) against the real API server and the real CRD:
rank 0's client, configured as in a pod (the in-cluster loader, a token of the job's worker ServiceAccount, the
cluster's CA), patches progress, the measured speeds and the re-planned strategy; they read back through
``kubectl``. A patch the API server refuses is logged and the next one goes through."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from stadi_worker.job.progress import ProgressEvent
from stadi_worker.job.status import for_job
from test_chart import JOBS_NS, Stadi, stadi_fixture  # noqa: F401  (the session fixture "stadi")
from test_jobs import ROOT, finish_pods, pods, status, wait_phase

pytestmark = pytest.mark.slow

NAME = "reporter"


def test_the_workers_status_patches_land_on_the_real_crd(stadi: Stadi, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    manifest = yaml.safe_load((ROOT / "manifests" / "examples" / "sdxl-patch.yaml").read_text())
    manifest["metadata"]["name"] = NAME
    stadi.cluster.apply(manifest, "-n", JOBS_NS)
    try:
        wait_phase(stadi, NAME, "Running")  # the operator made the worker's ServiceAccount and Role
        token = tmp_path / "token"
        token.write_text(stadi.cluster.token(f"{NAME}-worker", JOBS_NS, duration="10m"))
        host, port = stadi.cluster.server.removeprefix("https://").rsplit(":", 1)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)  # what the kubelet sets in a pod
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
        reporter = for_job(NAME, JOBS_NS, interval=0, token_file=token, ca_file=stadi.cluster.ca_file)
        assert reporter is not None

        replan = ProgressEvent("replan", 4, 50, 0, 2, speeds=[1.0, 0.5], strategy="stadi", strides=[1, 2],
                               rows=[[0, 80], [80, 128]], replanned=True)
        reporter(replan)
        stadi.cluster.wait_for(lambda: status(stadi, NAME).get("strategy") == "stadi", 30, "the re-plan's patch")
        st = status(stadi, NAME)
        assert st["progress"] == {"step": 4, "steps": 50, "imagesDone": 0, "imagesTotal": 2}
        assert st["gpus"] == 2 and st["progressText"] == "0/2 images"
        assert [m["speed"] for m in st["measured"]] == [1.0, 0.5]

        # a broken timer's NaN cannot be sent as JSON: the API server refuses that patch; logged, not raised
        with caplog.at_level(logging.WARNING, logger="stadi_worker.job.status"):
            bad = SimpleNamespace(ranks=[SimpleNamespace(rank=0, step_ms=[40.0], median_step_ms=float("nan"))],
                                  plan=None)
            reporter.finish(bad)
            stadi.cluster.wait_for(lambda: reporter.errors >= 1, 30, "the refused patch")
        assert any("job status not updated" in r.getMessage() and "HTTP 400" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]

        done = SimpleNamespace(ranks=[SimpleNamespace(rank=r, step_ms=[40.0, 41.0], median_step_ms=40.5)
                                      for r in (0, 1)], plan=SimpleNamespace(measured_speeds=[1.0, 0.5]))
        reporter(ProgressEvent("done", 50, 50, 2, 2))
        reporter.finish(done)
        reporter.close()
        st = status(stadi, NAME)
        assert st["progress"]["imagesDone"] == 2 and st["progressText"] == "2/2 images"
        assert [(m["rank"], m["medianMs"], m["stepMs"], m["speed"]) for m in st["measured"]] == [
            (0, 40.5, [40.0, 41.0], 1.0), (1, 40.5, [40.0, 41.0], 0.5)]
        finish_pods(stadi, pods(stadi, NAME, 1))
        wait_phase(stadi, NAME, "Succeeded")
        assert [m["medianMs"] for m in status(stadi, NAME)["measured"]] == [40.5, 40.5]  # the operator keeps them
    finally:
        stadi.kubectl("delete", "diffusionjob", NAME, "-n", JOBS_NS, "--wait=false", check=False)
