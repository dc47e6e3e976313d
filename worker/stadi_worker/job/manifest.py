"""``manifest.json``: what a job generated, with which plan, how long it took, and on what.

Written by rank 0 next to the images once every prompt is done. It is the record a benchmark or a user reads
back, so it is a pydantic model with a version field and round-trips through JSON unchanged.
"""

from __future__ import annotations

import platform
import socket
import statistics
from datetime import UTC, datetime
from importlib import metadata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stadi.api import ModelSource, Plan

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageRecord(_Base):
    """One prompt and the object it produced."""

    index: int = Field(ge=0)
    prompt: str
    seed: int
    name: str = Field(description="Object name relative to the output URI, e.g. image-0000.png.")
    uri: str
    skipped: bool = Field(False, description="Already in the output from an earlier attempt; not regenerated.")
    seconds: float | None = Field(None, description="Wall time of this image's generation on rank 0.")


class RankRecord(_Base):
    """One rank: where it ran and its measured denoiser step times (all images, in order)."""

    rank: int = Field(ge=0)
    host: str
    device: str = Field(description="GPU name (torch.cuda.get_device_name) or the CPU's description.")
    step_ms: list[float] = Field(default_factory=list)
    median_step_ms: float | None = None

    @classmethod
    def measure(cls, rank: int, device: str, step_ms: list[float], host: str | None = None) -> RankRecord:
        """A record with the median filled in."""
        return cls(
            rank=rank,
            host=host or socket.gethostname(),
            device=device,
            step_ms=[round(t, 4) for t in step_ms],
            median_step_ms=round(statistics.median(step_ms), 4) if step_ms else None,
        )


class PlanRecord(_Base):
    """The plan the job started with and the one it ended with (they differ when the re-plan after the
    first image's warmup predicted a gain above ``replanThreshold``)."""

    initial: Plan
    final: Plan
    measured_speeds: list[float] | None = Field(
        None, description="Per rank, from the warmup compute times, on the catalogue's scale (H100 = 1.0).")
    predicted_gain: float | None = Field(None, description="(old - new) / old predicted seconds at those speeds.")
    replanned: bool = False


class Timings(_Base):
    """Wall times in seconds, measured on rank 0."""

    load_s: float = 0.0
    generate_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    started: datetime
    finished: datetime


class Versions(_Base):
    """Software that produced the images."""

    stadi: str
    python: str
    torch: str | None = None
    diffusers: str | None = None
    transformers: str | None = None

    @classmethod
    def current(cls) -> Versions:
        """Versions of this process's interpreter and packages (None where a package is absent)."""
        return cls(
            stadi=_version("stadi") or "unknown",
            python=platform.python_version(),
            torch=_version("torch"),
            diffusers=_version("diffusers"),
            transformers=_version("transformers"),
        )


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class Manifest(_Base):
    """The contents of ``manifest.json``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job: str
    model: ModelSource
    output: str = Field(description="Output URI the image names are relative to.")
    format: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    negative_prompt: str = ""
    scheduler: str
    seed: int
    exact: bool = Field(False, description="Synchronous exchange at every step (exact patch parallelism).")
    images: list[ImageRecord]
    plan: PlanRecord
    ranks: list[RankRecord]
    timings: Timings
    versions: Versions

    def to_json(self) -> bytes:
        """Stable, human-readable JSON."""
        return (self.model_dump_json(indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse ``manifest.json`` (pydantic ValidationError when it does not match)."""
        return cls.model_validate_json(data)


def now() -> datetime:
    """Timezone-aware UTC now (the manifest's timestamps)."""
    return datetime.now(UTC)
