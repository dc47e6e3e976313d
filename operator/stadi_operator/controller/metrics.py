"""The operator's Prometheus metrics (prometheus_client, one registry per runtime): jobs by phase, planning
latency, time from creation to all pods running, re-plans and failures by reason, and the measured seconds per
image over the predicted ones. Served on ``metrics_port`` (``OperatorSettings``) by the startup handler."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from stadi_operator.controller.status import measured_image_seconds

PHASES = ("Pending", "Planning", "Queued", "Scheduling", "Running", "Suspended", "Succeeded", "Failed")


@dataclass
class OperatorMetrics:
    """Every metric of one operator, in a registry of its own (tests build as many as they like)."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    _phases: dict[tuple[str, str], str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        r = self.registry
        self.planning = Histogram("stadi_planning_seconds", "Time the planner took for one attempt.",
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.to_running = Histogram("stadi_job_time_to_running_seconds",
                                    "From the job's creation to all pods of an attempt running (queueing included).",
                                    buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.replans = Counter("stadi_replans_total", "Attempts started after the first, by reason.", ["reason"],
                               registry=r)
        self.failures = Counter("stadi_job_failures_total", "Jobs failed, by reason.", ["reason"], registry=r)
        self.prediction = Histogram("stadi_measured_over_predicted_ratio",
                                    "Seconds per image the workers measured over the plan's prediction.",
                                    buckets=(0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 3), registry=r)
        r.register(_PhaseCollector(self))

    def phase(self, namespace: str, name: str, phase: str | None) -> None:
        """The job's phase now (None: the job is gone)."""
        with self._lock:
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase

    def by_phase(self) -> dict[str, int]:
        with self._lock:
            found = Tally(self._phases.values())
        return {p: found.get(p, 0) for p in PHASES}


class _PhaseCollector:
    """``stadi_jobs{phase}``: the jobs this operator handles, by phase, counted when scraped."""

    def __init__(self, metrics: OperatorMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Any:
        family = GaugeMetricFamily("stadi_jobs", "DiffusionJobs by phase.", labels=["phase"])
        for phase, count in self.metrics.by_phase().items():
            family.add_metric([phase], count)
        yield family

    def describe(self) -> Any:
        yield GaugeMetricFamily("stadi_jobs", "DiffusionJobs by phase.", labels=["phase"])


def measured_over_predicted(status: dict[str, Any]) -> float | None:
    """Seconds per image the workers measured over the plan's prediction; None when either is missing."""
    plan = status.get("plan") or {}
    predicted = plan.get("predictedSeconds") or plan.get("predicted_seconds")
    measured = measured_image_seconds(plan, status.get("measured"))
    return measured / float(predicted) if measured and predicted else None
