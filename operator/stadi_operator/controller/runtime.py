"""What every handler needs besides the object (kept in kopf's memo), and one handler run's view of a job."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from stadi.policy import repository
from stadi_operator.controller import children as ch
from stadi_operator.controller.gpu_book import GpuBook
from stadi_operator.controller.indexes import Indexes
from stadi_operator.controller.metrics import OperatorMetrics
from stadi_operator.controller.status import StatusUpdate
from stadi_operator.kube import Kube
from stadi_operator.settings import OperatorSettings

log = logging.getLogger("stadi_operator.controller")


@dataclass
class Runtime:
    """What every handler needs besides the object: settings, the API adapter, detected features, a clock.
    Built once at startup and kept in kopf's memo."""

    settings: OperatorSettings
    kube: Kube
    volcano: bool = False
    kueue: bool = False  # Kueue's Workload API is served
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    book: GpuBook = field(default_factory=lambda: GpuBook())
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)

    @property
    def worker_options(self) -> ch.WorkerOptions:
        """The operator-wide choices that shape the worker pods."""
        s = self.settings
        return ch.WorkerOptions(image=s.worker_image, port=s.rendezvous_port, volcano=self.volcano,
                                run_as_user=s.worker_uid, progress_interval=s.progress_interval,
                                cache=s.worker_cache, dra_device_class=s.dra_device_class, limits=s.limits,
                                egress=tuple(s.worker_egress) if s.network_policy else None,
                                collective_ports=s.collective_ports)


    @property
    def allowed_images(self) -> list[str]:
        """The worker images a job may name: the repository of the worker image, then the settings' list (the
        chart's order)."""
        default = repository(self.settings.worker_image or ch.DEFAULT_WORKER_IMAGE)
        return list(dict.fromkeys([default, *self.settings.allowed_images]))


def runtime_of(memo: Any) -> Runtime:
    """The runtime the startup handler put into kopf's memo."""
    runtime = getattr(memo, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise kopf.PermanentError("operator not started: memo.runtime is missing")
    return runtime


@dataclass
class Job:
    """One handler run's view of a DiffusionJob."""

    runtime: Runtime
    body: Mapping[str, Any]
    status: StatusUpdate
    logger: logging.Logger | logging.LoggerAdapter[Any]
    indexes: Indexes

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Job:
        """The view of the object a handler was called for, from kopf's keyword arguments."""
        runtime = runtime_of(kwargs["memo"])
        body = kwargs["body"]
        status = StatusUpdate(body.get("status"), body.get("metadata", {}).get("generation"), runtime.clock())
        return cls(runtime, body, status, kwargs.get("logger") or log, Indexes.of(kwargs))

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def owner(self) -> ch.Owner:
        return ch.Owner(self.name, self.namespace, str(self.body["metadata"].get("uid", "")))

    @property
    def kube(self) -> Kube:
        return self.runtime.kube

    @property
    def now(self) -> datetime:
        return self.status.now

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        """Log and post an Event about the job."""
        (self.logger.warning if warning else self.logger.info)(f"{reason}: {message}")
        self.kube.event(dict(self.body), reason, message, warning=warning, now=self.now)
