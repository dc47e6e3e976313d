"""Speeds that persist, on the real control plane: a job's workers report measured speeds (written as rank 0
writes them), the job succeeds, the operator records them in the GPUNodes; the next job of the same kind is
planned with them and says so in an event."""

from __future__ import annotations

import json

import pytest
import yaml
from test_chart import JOBS_NS, Stadi, stadi_fixture  # noqa: F401  (the session fixture "stadi")
from test_jobs import ROOT, finish_pods, pods, wait_phase, worker_patch

pytestmark = pytest.mark.slow

FAST = 1.5  # faster than the catalogue's H100 (1.0): the next plan prefers those GPUs again


def job(name: str) -> dict[str, object]:
    manifest = yaml.safe_load((ROOT / "manifests" / "examples" / "sdxl.yaml").read_text())
    manifest["metadata"]["name"] = name
    return manifest


def events(stadi: Stadi, name: str) -> list[tuple[str, str]]:
    items = stadi.cluster.kubectl_json("get", "events", "-n", JOBS_NS, "--field-selector",
                                       f"involvedObject.name={name},involvedObject.kind=DiffusionJob")["items"]
    return [(e["reason"], e["message"]) for e in items]


def forget_learned(stadi: Stadi, nodes: list[str]) -> None:
    for node in nodes:
        stadi.kubectl("patch", "gpunode", node, "--subresource=status", "--type=merge", "-p",
                      json.dumps({"status": {"learned": []}}), check=False)


def test_the_second_job_is_planned_from_the_firsts_measurements(stadi: Stadi) -> None:
    # earlier tests' jobs may have reported speeds too: start from none
    forget_learned(stadi, [n["metadata"]["name"] for n in stadi.cluster.kubectl_json("get", "gpunodes")["items"]])
    touched: set[str] = set()
    try:
        stadi.cluster.apply(job("learn-first"), "-n", JOBS_NS)
        first = wait_phase(stadi, "learn-first", "Running")["plan"]
        gpus = {(r["node"], r["gpuIndex"]) for r in first["ranks"] if not r.get("idle")}
        touched = {node for node, _ in gpus}
        worker_patch(stadi, "learn-first", {"measured": [{"rank": r["rank"], "speed": FAST, "stepMs": []}
                                                         for r in first["ranks"]]})
        finish_pods(stadi, pods(stadi, "learn-first", 1))
        wait_phase(stadi, "learn-first", "Succeeded")
        learned = {(node, e["index"]): e for node in touched
                   for e in stadi.cluster.kubectl_json("get", "gpunode", node).get("status", {}).get("learned", [])}
        assert set(learned) == gpus and {e["speed"] for e in learned.values()} == {FAST}
        assert {e["job"] for e in learned.values()} == {f"{JOBS_NS}/learn-first"}

        stadi.cluster.apply(job("learn-second"), "-n", JOBS_NS)
        second = wait_phase(stadi, "learn-second", "Running")["plan"]
        speeds = {(r["node"], r["gpuIndex"]): r["speed"] for r in second["ranks"] if not r.get("idle")}
        # on the first job's GPUs (faster than any other now; maybe fewer of them), at their measured speed
        assert speeds and set(speeds) <= gpus and all(s == pytest.approx(FAST, rel=1e-3) for s in speeds.values())
        assert any(reason == "LearnedSpeeds" for reason, _ in events(stadi, "learn-second"))
        finish_pods(stadi, pods(stadi, "learn-second", 1))
        wait_phase(stadi, "learn-second", "Succeeded")
    finally:
        for name in ("learn-first", "learn-second"):
            stadi.kubectl("delete", "diffusionjob", name, "-n", JOBS_NS, "--wait=false", check=False)
        forget_learned(stadi, sorted(touched))  # later tests plan on the catalogue again
