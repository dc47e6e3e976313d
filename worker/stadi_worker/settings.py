"""Worker settings: one pydantic-settings object, read from ``STADI_*`` environment variables (the operator's
pods and ``stadi run`` set them) and overridden by command-line flags. It is read once, by the command that
starts a rank, and passed down; no other worker module reads the environment (torchrun's RANK, WORLD_SIZE,
... excepted: they belong to the process group, which reads them too)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stadi.policy import Limits
from stadi_worker.engine.options import EngineOptions
from stadi_worker.engine.runtime import DEFAULT_TIMEOUT_S, TEARDOWN_S
from stadi_worker.job.loading import DEFAULT_CACHE, models_dir
from stadi_worker.job.status import DEFAULT_INTERVAL_S, SA_DIR

LIMITS = Limits()  # the defaults of the limits below (the operator passes the chart's)
DEFAULT_CONFIG_DIR = Path("/etc/stadi")  # where the operator mounts the job's ConfigMap
# where worker pods mount the output credentials Secret (the operator mounts it here)
DEFAULT_CREDENTIALS_DIR = Path("/var/run/secrets/stadi/output")


class WorkerSettings(BaseSettings):
    """What one rank needs to know besides its plan and job. Every field is ``STADI_<NAME>`` in the
    environment; flags of ``stadi worker`` override them."""

    model_config = SettingsConfigDict(env_prefix="STADI_", extra="ignore")

    # inputs
    plan: str | None = Field(None, description="Plan JSON: a file path or the JSON itself.")
    job: str | None = Field(None, description="DiffusionJob YAML/JSON: a file path or inline JSON.")
    config_dir: Path = Field(DEFAULT_CONFIG_DIR, description="The mounted ConfigMap: plan.json, job.yaml/json.")
    job_name: str | None = Field(None, description="The DiffusionJob's name (the operator sets it).")
    job_namespace: str | None = Field(None, description="The DiffusionJob's namespace (the operator sets it).")
    # output
    output: str | None = Field(None, description="Overrides the job's spec.output.uri.")
    endpoint: str | None = Field(None, description="Overrides the job's S3 endpoint.")
    credentials_dir: Path | None = Field(
        None, description="A mounted Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY files; default: "
        f"{DEFAULT_CREDENTIALS_DIR} when it exists, else boto3's chain (the environment).")
    cache: Path = Field(DEFAULT_CACHE, description="Node cache: models copied from object storage, random pipelines, "
                        "compiled artifacts.")
    # the cluster's limits on untrusted inputs (the operator sets the chart's)
    max_prompts: int = Field(LIMITS.max_prompts, ge=1, description="Prompts (so images) per job.")
    max_prompt_length: int = Field(LIMITS.max_prompt_length, ge=1, description="Characters of one prompt.")
    max_prompts_from_bytes: int = Field(LIMITS.max_prompts_from_bytes, ge=1,
                                        description="Bytes of the promptsFrom object; larger is refused unread.")
    # execution
    device: Literal["cpu", "cuda"] | None = Field(None, description="Default: cuda when a GPU is visible.")
    exact: bool = Field(False, description="Synchronous exchange at every step (exact, slower).")
    dist_timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, description="Bound of every collective: a dead "
                                  "peer surfaces as an error after this, never as a hang.")
    teardown_s: float = Field(TEARDOWN_S, ge=0, description="How long leaving an NCCL group may take.")
    cuda_graphs: bool = Field(True, description="Debugging: 0 runs GPU steps eagerly.")
    compile: str | None = Field(None, description="Debugging: overrides the job's model.compile (0 never, 1 "
                                "inductor, or a torch.compile backend name).")
    slowdown: str = Field("", description='FOR TESTS AND BENCHMARKS ONLY: "RANK=FACTOR,..." emulates slower '
                          "devices (stadi run --slowdown sets it).")
    # reporting
    progress: str | None = Field(None, description="Rank 0's progress as JSON lines: fd:N, a file, or - (stdout).")
    progress_interval: float = Field(DEFAULT_INTERVAL_S, ge=0, description="Seconds between status patches of "
                                     "the job.")
    kubeconfig: Path | None = Field(None, description="Report to the API server of this kubeconfig instead of "
                                    "the in-cluster ServiceAccount (development and tests).")
    kube_token_file: Path = Field(SA_DIR / "token", description="The in-cluster ServiceAccount's token.")
    kube_ca_file: Path = Field(SA_DIR / "ca.crt", description="The in-cluster API server's CA bundle.")
    log_level: str = Field("WARNING", description="DEBUG, INFO, WARNING, ERROR.")

    @field_validator("compile", "output", "endpoint", "plan", "job", "progress", "job_name", "job_namespace",
                     mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def limits(self) -> Limits:
        """The sizes the job's inputs may have."""
        return Limits(max_prompts=self.max_prompts, max_prompt_length=self.max_prompt_length,
                      max_prompts_from_bytes=self.max_prompts_from_bytes)

    @property
    def engine(self) -> EngineOptions:
        """The engine's switches."""
        return EngineOptions(cuda_graphs=self.cuda_graphs, compile=self.compile)

    @property
    def compile_env(self) -> dict[str, str]:
        """torch.compile's caches in the node cache (inductor's FX graphs, AOTAutograd and Triton kernels), so
        a later job with the same model and sizes loads its compiled steps instead of compiling them."""
        root = self.cache / "compile"
        return {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}

    @property
    def models_dir(self) -> Path:
        """Where model weights copied from object storage and random pipelines are kept."""
        return models_dir(self.cache)

    def output_credentials(self) -> Path | None:
        """The credentials directory to use: as set, else the operator's mount when it exists."""
        if self.credentials_dir is not None:
            return self.credentials_dir
        return DEFAULT_CREDENTIALS_DIR if DEFAULT_CREDENTIALS_DIR.is_dir() else None
