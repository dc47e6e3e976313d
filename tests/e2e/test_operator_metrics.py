"""The running operator's Prometheus /metrics, scraped after a job ran to success on the real control plane:
jobs by phase, planning latency, time to running, and the measured over predicted seconds per image (the
measurement written as the worker writes it)."""

from __future__ import annotations

import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_chart import JOBS_NS, Stadi, stadi_fixture  # noqa: F401  (the session fixture "stadi")
from test_jobs import ROOT, finish_pods, pods, wait_phase, worker_patch

pytestmark = pytest.mark.slow

NAME = "metered"


def scrape(stadi: Stadi) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stadi.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_operator_serves_its_metrics(stadi: Stadi) -> None:
    before = scrape(stadi)
    manifest = yaml.safe_load((ROOT / "manifests" / "examples" / "sdxl.yaml").read_text())
    manifest["metadata"]["name"] = NAME
    stadi.cluster.apply(manifest, "-n", JOBS_NS)
    try:
        st = wait_phase(stadi, NAME, "Running")
        plan = st["plan"]
        # rank 0's median step, as the worker reports it: the whole image 1.2 times the prediction
        median = 1.2 * plan["predictedSeconds"] * 1000 / plan["steps"]
        worker_patch(stadi, NAME, {"measured": [{"rank": 0, "medianMs": median, "stepMs": [median]}]})
        finish_pods(stadi, pods(stadi, NAME, 1))
        st = wait_phase(stadi, NAME, "Succeeded")
        after = scrape(stadi)
        wide = stadi.kubectl("get", "dj", NAME, "-n", JOBS_NS, "-o", "wide").stdout
        speedup = f"{plan['alternatives']['single'] / (1.2 * plan['predictedSeconds']):.2f}x"
        assert st["speedupText"] == speedup and speedup in wide  # -o wide: the measured speed-up
    finally:
        stadi.kubectl("delete", "diffusionjob", NAME, "-n", JOBS_NS, "--wait=false", check=False)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert after[("stadi_jobs", (("phase", "Succeeded"),))] >= 1
    assert {phase for (name, labels), _ in after.items() if name == "stadi_jobs" for _, phase in labels} >= {
        "Pending", "Planning", "Queued", "Scheduling", "Running", "Succeeded", "Failed"}
    assert grew("stadi_planning_seconds_count") >= 1
    assert grew("stadi_job_time_to_running_seconds_count") >= 1
    assert grew("stadi_measured_over_predicted_ratio_count") == 1
    assert grew("stadi_measured_over_predicted_ratio_bucket", le="1.25") == 1
    assert grew("stadi_measured_over_predicted_ratio_bucket", le="1.1") == 0
