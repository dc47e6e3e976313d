"""Operator settings: one pydantic-settings object, read from ``STADI_OPERATOR_*`` environment variables and
overridden by command-line flags. Handlers read it from kopf's ``memo``; nothing here is global state."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from stadi.policy import Limits

LIMITS = Limits()  # the defaults of the limits below
# Linux's default ephemeral ports (net.ipv4.ip_local_port_range): where NCCL's and Gloo's sockets listen, besides
# the rendezvous port.
EPHEMERAL_PORTS = (32768, 60999)

# kopf keeps handler progress and the last-handled spec in annotations with this prefix instead of its
# default `status.kopf`: the DiffusionJob status schema is generated from the pydantic model and has no
# room for kopf's bookkeeping (the apiserver would prune it and kopf would re-run handlers forever).
ANNOTATION_PREFIX = "stadi.dev"


class OperatorSettings(BaseSettings):
    """What the operator needs to know besides the cluster's state."""

    model_config = SettingsConfigDict(env_prefix="STADI_OPERATOR_", extra="ignore")

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Namespaces to watch (comma-separated in the env); empty: all."
    )
    worker_image: str | None = Field(
        None, description="Worker image used when a job does not set spec.template.image explicitly."
    )
    allowed_images: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Worker images a job may name in spec.template.image (comma-separated in "
        "the env): repositories, prefixes ending in '/', sha256: digests (stadi.policy.image_allowed). The "
        "repository of the worker image is always allowed.")
    max_prompts: int = Field(LIMITS.max_prompts, ge=1, description="Prompts (so images) per job.")
    max_prompt_length: int = Field(LIMITS.max_prompt_length, ge=1, description="Characters of one prompt.")
    max_prompts_from_bytes: int = Field(LIMITS.max_prompts_from_bytes, ge=1,
                                        description="Bytes of a promptsFrom object (the workers check it).")
    network_policy: bool = Field(False, description="Give each job a NetworkPolicy for its worker pods: ingress "
                                 "and egress within its gang, plus the egress rules of worker_egress.")
    collective_ports: tuple[Annotated[int, Field(ge=1, le=65535)], Annotated[int, Field(ge=1, le=65535)]] = Field(
        EPHEMERAL_PORTS, description="The port range the ranks' collectives listen on (JSON [from, to]).")
    worker_egress: list[dict[str, Any]] = Field(
        default_factory=list, description="NetworkPolicy egress rules of every worker pod besides its gang (JSON): "
        "DNS, the API server, the storage endpoints.")
    rendezvous_port: int = Field(29500, ge=1, le=65535, description="torchrun master port of rank 0.")
    unschedulable_timeout: float = Field(
        120.0, gt=0, description="Seconds a gang may stay unschedulable (or unplannable) before a re-plan."
    )
    reconcile_interval: float = Field(5.0, gt=0, description="Seconds between checks of a job's pods.")
    progress_interval: float = Field(
        5.0, gt=0, description="Seconds between the worker's status.progress patches (passed to the pods)."
    )
    telemetry_stale_after: float = Field(
        60.0, gt=0, description="GPUNode telemetry older than this is ignored (its GPUs count as idle)."
    )
    # kopf's hanging-watch pitfall: without these a watch silently stalled by a proxy or load balancer is never
    # noticed; the server closes each watch after server_timeout and the client gives up shortly after.
    # Whole seconds: the apiserver rejects a fractional timeoutSeconds on a watch.
    watch_server_timeout: int = Field(300, gt=0)
    watch_client_timeout: float = Field(330.0, gt=0)
    watch_connect_timeout: float = Field(10.0, gt=0)
    request_timeout: float = Field(30.0, gt=0, description="Timeout of one API request (children, events).")
    retry_backoff: float = Field(10.0, gt=0, description="Seconds before kopf retries a failed handler.")
    volcano: Literal["auto", "on", "off"] = Field(
        "auto", description="Create Volcano PodGroups: auto = when podgroups.scheduling.volcano.sh exists."
    )
    worker_uid: int = Field(1000, ge=1, description="Non-root user the worker containers run as.")
    # The workers' cache holds models copied from object storage and torch.compile's artifacts; on a volume that
    # outlives the pod, the next job with the same model and sizes starts without copying or compiling again.
    worker_cache_host_path: str | None = Field(
        None, description="Mount this directory of the node as the workers' cache (else an emptyDir per pod).")
    worker_cache_claim: str | None = Field(
        None, description="Mount this PersistentVolumeClaim of the job's namespace as the workers' cache.")
    liveness_port: int | None = Field(None, description="Serve kopf's /healthz on this port when set.")
    learned_half_life: float = Field(
        7 * 24 * 3600.0, gt=0, description="Seconds after which a speed learned from a finished job weighs half in "
        "the next plans (the rest: the catalogue speed times (1 - load)).")
    metrics_port: int | None = Field(None, ge=0, le=65535,
                                     description="Serve Prometheus /metrics on this port when set.")
    dra_device_class: str = Field(
        "gpu.nvidia.com", description="The DeviceClass of the GPUs that DRA ResourceSlices publish (NVIDIA's DRA "
        "driver installs gpu.nvidia.com): worker pods on such nodes claim their planned GPUs from it.")

    @field_validator("worker_cache_host_path", "worker_cache_claim", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("worker_cache_host_path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must be an absolute path on the node, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_cache(self) -> OperatorSettings:
        if self.worker_cache_host_path and self.worker_cache_claim:
            raise ValueError("set worker_cache_host_path or worker_cache_claim, not both")
        return self

    @field_validator("collective_ports")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] > value[1]:
            raise ValueError(f"the range {value[0]}-{value[1]} is empty: give [from, to] with from <= to")
        return value

    @property
    def worker_cache(self) -> dict[str, Any]:
        """The volume source of the workers' cache."""
        if self.worker_cache_host_path:
            return {"hostPath": {"path": self.worker_cache_host_path, "type": "DirectoryOrCreate"}}
        if self.worker_cache_claim:
            return {"persistentVolumeClaim": {"claimName": self.worker_cache_claim}}
        return {"emptyDir": {}}

    @property
    def limits(self) -> Limits:
        """The sizes a job's untrusted inputs may have."""
        return Limits(max_prompts=self.max_prompts, max_prompt_length=self.max_prompt_length,
                      max_prompts_from_bytes=self.max_prompts_from_bytes)

    @field_validator("namespaces", "allowed_images", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def configure_kopf(self, settings: Any) -> None:
        """Apply these settings to ``kopf.OperatorSettings`` (called from the startup handler)."""
        import kopf

        settings.watching.server_timeout = self.watch_server_timeout
        settings.watching.client_timeout = self.watch_client_timeout
        settings.watching.connect_timeout = self.watch_connect_timeout
        settings.networking.request_timeout = self.request_timeout
        settings.networking.connect_timeout = self.watch_connect_timeout
        settings.execution.max_workers = 8  # sync handlers run in threads; a few suffice for one replica
        settings.queueing.error_delays = (1, 5, 10, 30, 60)
        # The reconcile timer deletes a job past its ttlSecondsAfterFinished from inside its own run, so kopf finds
        # it still running when the deletion arrives and keeps its finalizer until the next check: every 60 s by
        # default, which would leave the job Terminating for a minute.
        settings.background.cancellation_polling = 2.0
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
        )
        settings.posting.enabled = False  # handlers post their own events, with CamelCase reasons
