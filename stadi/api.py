"""The DiffusionJob and GPUNode resources (group ``stadi.dev``, version ``v1alpha1``) and the Plan.

These pydantic models are the source of truth: the CRD schemas are generated from them (``stadi crd``).
Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from stadi.families import (
    BUILTIN_MODELS,
    GUIDANCE_DISTILLED,
    HYBRID_DEFAULTS,
    HybridSchedule,
    profile,
    runs_cfg,
    text_bands,
)

GROUP = "stadi.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

Strategy = Literal["auto", "single", "patch", "cfg", "cfg-stride", "cfg-stride+band", "stadi", "stadi+cfg", "hybrid"]
STRATEGIES: tuple[str, ...] = ("auto", "single", "patch", "cfg", "cfg-stride", "cfg-stride+band", "stadi", "stadi+cfg",
                               "hybrid")
# How much approximation auto may use (spec.parallelism.quality); each strategy's class is in
# stadi.planner.fidelity, with the trained-model figures that put it there.
Quality = Literal["exact", "balanced", "fastest"]
QUALITIES: tuple[str, ...] = ("exact", "balanced", "fastest")
# A plan's fidelity class (stadi.planner.fidelity): equal to one GPU up to float error, within the measured
# bound, or beyond it (or not measured).
Fidelity = Literal["exact", "bounded", "approximate"]
FIDELITIES: tuple[str, ...] = ("exact", "bounded", "approximate")
Scheduler = Literal["default", "ddim", "euler", "dpmpp-2m", "flow-euler"]
OUTPUT_SCHEMES = ("s3", "file")
MODEL_SCHEMES = ("s3", "file", "random", "builtin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123: the parts of a DNS subdomain

# A DiffusionJob's name names its headless Service, which must be an RFC 1035 label (a letter first), and prefixes
# its pods' host names `<job>-a<attempt>-<i>` (63-character labels). The CRD's CEL rule is built from these three.
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
JOB_NAME_MAX = 52
JOB_NAME_RULE = (
    f"must be a DNS label (RFC 1035): a lowercase letter first, then lowercase letters, digits and '-', ending "
    f"with a letter or digit, at most {JOB_NAME_MAX} characters (it names the job's Service and its pods' hosts)"
)
# Strategies that split the two guidance branches, and those that read parallelism.hybrid.
GUIDANCE_SPLITS = ("cfg", "cfg-stride", "cfg-stride+band", "stadi+cfg", "hybrid")
HYBRID_KNOB_STRATEGIES = ("hybrid", "auto")
# Strategies that run on exactly two GPUs, whatever the pool offers.
PAIR_STRATEGIES = ("cfg-stride", "cfg-stride+band", "hybrid")
# Strategies that run in the branch-stride engine (one rank per guidance branch, the uncond one strided).
BRANCH_STRIDES = ("cfg-stride", "cfg-stride+band")
PAIR_GPUS = 2

# Schema-only patterns (json_schema_extra): the CRD carries them so that the apiserver rejects what the
# validators below reject, while pydantic keeps the validators' clearer messages. Go RE2 syntax.
SOURCE_PATTERN = (r"^((s3|file)://|random://(tiny|full)$|builtin://(" + "|".join(BUILTIN_MODELS) + r")$"
                  r"|[A-Za-z0-9][-\w.]*/[-\w.]+$)")
OUTPUT_URI_PATTERN = r"^(s3://[^/]|file:///)"
OBJECT_URI_PATTERN = r"^(s3|file)://"
ENDPOINT_PATTERN = r"^https?://"


class FieldError(ValueError):
    """A broken cross-field rule, raised by a model validator: ``field`` is the wire path, relative to the model,
    of the field the message is about (what :func:`describe_errors` names, and what the CRD's CEL rule names in
    its ``fieldPath``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Model(BaseModel):
    """Base for every API object: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def dump(self) -> dict[str, Any]:
        """The wire form: camelCase, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelSource(Model):
    """Which diffusion model to run and where its weights are."""

    family: Literal["sdxl", "sd3", "sd15", "pixart", "flux"] = Field(
        description="Model architecture family; decides the layer wrappers and the band granularity."
    )
    source: str = Field(
        description="Weights: s3://bucket/path, file:///dir (a mounted volume), a hub id (org/name) where the "
        "cluster has network, builtin://NAME (a small model trained by the project and shipped with the worker: "
        f"{', '.join(BUILTIN_MODELS)}), or random://tiny | random://full (random weights, for tests and "
        "benchmarks).",
        json_schema_extra={"pattern": SOURCE_PATTERN},
    )
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="Weights and compute dtype.")
    compile: bool = Field(
        False, description="torch.compile the denoiser steps (whole frames and bands) inside their CUDA graphs: "
        "about a fifth less per step after a compile of a minute or two (one per batch size for bands), kept in the "
        "workers' cache for the next job. The planner counts it.")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if "://" in value:
            scheme = value.split("://", 1)[0]
            if scheme not in MODEL_SCHEMES:
                raise ValueError(
                    f"unsupported scheme {scheme!r}; allowed: s3://, file://, random://, builtin://, or a hub id "
                    "org/name"
                )
            if scheme == "random" and value not in ("random://tiny", "random://full"):
                raise ValueError("random weights are random://tiny or random://full")
            if scheme == "builtin" and value.removeprefix("builtin://") not in BUILTIN_MODELS:
                raise ValueError(f"unknown built-in model; allowed: "
                                 f"{', '.join('builtin://' + name for name in BUILTIN_MODELS)}")
        elif not _HUB_ID.match(value):
            raise ValueError("must be s3://…, file://…, builtin://NAME, random://tiny|full, or a hub id of the form "
                             "org/name")
        return value

    @model_validator(mode="after")
    def _builtin_family(self) -> ModelSource:
        name = self.source.removeprefix("builtin://")
        if self.source.startswith("builtin://") and BUILTIN_MODELS[name] != self.family:
            raise FieldError("source", f"builtin://{name} is a {BUILTIN_MODELS[name]} model, not {self.family}")
        return self


class GpuRange(Model):
    """How many GPUs the job may use."""

    min: Annotated[int, Field(ge=1, le=1024, description="Fewest GPUs the job runs on; must be <= max.")] = 1
    max: Annotated[int, Field(ge=1, le=1024, description="Most GPUs the planner may use.")] = 8

    @model_validator(mode="after")
    def _ordered(self) -> GpuRange:
        if self.min > self.max:
            raise FieldError("min", f"must be <= max ({self.max}), got {self.min}")
        return self


class HybridParallelism(Model):
    """Strategy hybrid: condition split, then a pipeline window of the denoiser's layers on the two GPUs.
    Each knob left out takes the model family's default (SDXL 12 / 4e-4 / 5 / 15, SD3 15 / 5e-4 / 5 / 40)."""

    window: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None, description="L: steps over which the slope of the branch discrepancy is taken.")
    slope_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="The window starts once the discrepancy decreases by less than this per step.")
    pipeline_steps: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None, description="k: steps the pipeline window lasts.")
    cap_step: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        None, description="The window starts at this step at the latest.")


class Parallelism(Model):
    """How the work is split across GPUs."""

    strategy: Strategy = Field("auto", description="auto picks the lowest predicted latency within quality.")
    quality: Quality = Field(
        "balanced", description="How much approximation auto may use: exact (only strategies equal to one GPU up "
        "to float error), balanced (stale context, strides and branch reuse within the measured bound), fastest "
        "(any).")
    gpus: GpuRange = Field(default_factory=GpuRange)
    warmup_steps: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        None, description="Synchronous steps before re-planning (default: min(4, steps)); must be <= steps."
    )
    max_stride: Annotated[
        int, Field(ge=1, le=16, description="Largest temporal stride a slow GPU may get.")
    ] = 4
    min_effective_steps: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None, description="Fewest sampler steps any rank may run (default: min(20, steps)); must be <= steps."
    )
    replan_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.05, description="Re-plan after warmup only when the predicted gain exceeds this fraction."
    )
    hybrid: HybridParallelism | None = Field(
        None, description="Knobs of strategy hybrid (also used when auto picks it); family defaults when unset."
    )


class Output(Model):
    """Where images and the manifest go."""

    uri: str = Field(
        description="s3://bucket/prefix or file:///path", json_schema_extra={"pattern": OUTPUT_URI_PATTERN}
    )
    format: Literal["png", "jpeg", "webp"] = "png"
    credentials_secret: str | None = Field(
        None, description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3:// outputs."
    )
    endpoint: str | None = Field(
        None,
        description="S3 endpoint URL, http:// or https:// (MinIO, Ceph); AWS when unset.",
        json_schema_extra={"pattern": ENDPOINT_PATTERN},
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in OUTPUT_SCHEMES:
            raise ValueError(f"unsupported output URI {value!r}; allowed schemes: s3://, file://")
        rest = value.split("://", 1)[1]
        if scheme == "s3" and not rest.split("/", 1)[0]:
            raise ValueError("s3:// URI needs a bucket: s3://bucket/prefix")
        if scheme == "file" and not rest.startswith("/"):
            raise ValueError("file:// URI needs an absolute path: file:///path")
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("endpoint must be an http:// or https:// URL")
        return value


class Toleration(Model):
    """A Kubernetes toleration for the worker pods."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Resources(Model):
    """Extra container resources (quantities as strings, e.g. "8", "32Gi")."""

    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)


class PodTemplate(Model):
    """What the worker pods look like."""

    image: str | None = Field(None, description="Worker image; the operator's default worker image when unset.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")


def _not_blank(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("blank; every prompt needs text")
    return prompt


class DiffusionJobSpec(Model):
    """What to generate, with which model, on how many GPUs, and where to put it."""

    model: ModelSource
    # An empty list or a blank prompt is refused by the validators; minItems and the pattern let the apiserver
    # refuse them too.
    prompts: list[
        Annotated[str, Field(min_length=1, json_schema_extra={"pattern": r"\S"}), AfterValidator(_not_blank)]
    ] | None = Field(
        None,
        description="Prompts; one image per prompt (seed + index). Exactly one of prompts and promptsFrom.",
        json_schema_extra={"minItems": 1},
    )
    prompts_from: str | None = Field(
        None,
        description="Object URI (s3:// or file://) of a text file with one prompt per line.",
        json_schema_extra={"pattern": OBJECT_URI_PATTERN},
    )
    negative_prompt: str = ""
    height: Annotated[
        int, Field(ge=64, le=8192, description="Image height in pixels; a multiple of the family's granularity.")
    ] = 1024
    width: Annotated[
        int, Field(ge=64, le=8192, description="Image width in pixels; a multiple of the family's granularity.")
    ] = 1024
    steps: Annotated[int, Field(ge=1, le=1000, description="Denoising steps.")] = 50
    guidance_scale: Annotated[
        float, Field(ge=0.0, le=100.0, description="Classifier-free guidance scale; above 1 runs two branches "
                     "(guidance-distilled families, flux: the distilled guidance, one branch).")
    ] = 5.0
    seed: Annotated[int, Field(ge=0, le=2**63 - 1, description="Seed of image 0; image i uses seed + i.")] = 0
    scheduler: Scheduler = Field("default", description="Sampler; default is the family's usual one.")
    parallelism: Parallelism = Field(default_factory=Parallelism)
    output: Output
    template: PodTemplate = Field(default_factory=PodTemplate)
    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    suspend: bool = Field(
        False, description="As on a Job: a suspended job has no worker pods. Suspending a running job stops its pods "
        "and keeps every image already written; resuming plans again on the GPUs free then and generates only the "
        "missing images.")
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must hold at least one prompt")
        return value

    @field_validator("prompts_from")
    @classmethod
    def _prompts_from(cls, value: str | None) -> str | None:
        if value is not None and value.split("://", 1)[0] not in OUTPUT_SCHEMES:
            raise ValueError("must be an s3:// or file:// URI")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DiffusionJobSpec:
        # Each rule names its field as the CRD's CEL rule does (stadi.crd), and tests/validation_cases.py holds
        # a case of each that pydantic, the operator and the API server must all refuse naming that field.
        if (self.prompts is None) == (self.prompts_from is None):
            raise FieldError("prompts", "set exactly one of prompts or promptsFrom")
        fam = profile(self.model.family)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % fam.pixel_multiple:
                raise FieldError(name,
                                 f"{name} {value} is not a multiple of {fam.pixel_multiple} "
                                 f"(the {self.model.family} band granularity: {fam.granularity} latent rows of "
                                 f"{fam.vae_factor} px)")
        p = self.parallelism
        if p.warmup_steps is not None and p.warmup_steps > self.steps:
            raise FieldError("parallelism.warmupSteps", f"must be <= steps ({self.steps}), got {p.warmup_steps}")
        if p.min_effective_steps is not None and p.min_effective_steps > self.steps:
            raise FieldError("parallelism.minEffectiveSteps",
                             f"must be <= steps ({self.steps}), got {p.min_effective_steps}")
        if p.strategy in GUIDANCE_SPLITS and self.model.family in GUIDANCE_DISTILLED:
            raise FieldError("parallelism.strategy", f"{p.strategy!r} splits the guidance branches; "
                             f"{self.model.family!r} is guidance-distilled (one branch per step)")
        if p.strategy in GUIDANCE_SPLITS and not self.uses_cfg:
            raise FieldError("parallelism.strategy", f"{p.strategy!r} splits the guidance branches and needs "
                             f"guidanceScale > 1, got {self.guidance_scale:g}")
        if p.strategy == "hybrid" and self.model.family not in HYBRID_DEFAULTS:
            raise FieldError("parallelism.strategy", f"'hybrid' splits the denoiser of "
                             f"{', '.join(HYBRID_DEFAULTS)} models only, not {self.model.family!r}")
        if p.strategy in PAIR_STRATEGIES and not p.gpus.min <= PAIR_GPUS <= p.gpus.max:
            raise FieldError("parallelism.gpus", f"strategy {p.strategy!r} runs on exactly {PAIR_GPUS} GPUs; "
                             f"min {p.gpus.min} to max {p.gpus.max} does not allow {PAIR_GPUS}")
        if p.hybrid is not None and p.strategy not in HYBRID_KNOB_STRATEGIES:
            raise FieldError("parallelism.hybrid",
                             f"applies to strategy {' or '.join(HYBRID_KNOB_STRATEGIES)}, not {p.strategy!r}")
        return self

    @property
    def warmup_steps(self) -> int:
        """Synchronous warmup steps: as set, else 4 (fewer for a shorter job)."""
        w = self.parallelism.warmup_steps
        return min(4, self.steps) if w is None else w

    @property
    def min_effective_steps(self) -> int:
        """Fewest sampler steps any rank may run: as set, else 20 (fewer for a shorter job)."""
        m = self.parallelism.min_effective_steps
        return min(20, self.steps) if m is None else m

    @property
    def hybrid_schedule(self) -> HybridSchedule | None:
        """Strategy hybrid's schedule: the knobs set under parallelism.hybrid, the family's defaults for the
        rest; None for a family without a stage split."""
        base = HYBRID_DEFAULTS.get(self.model.family)
        if base is None:
            return None
        knobs = self.parallelism.hybrid.model_dump(exclude_none=True) if self.parallelism.hybrid else {}
        return replace(base, **knobs)

    @property
    def uses_cfg(self) -> bool:
        """Classifier-free guidance runs two branches (batch 2): the scale above 1, the family not
        guidance-distilled (``families.runs_cfg``)."""
        return runs_cfg(self.model.family, self.guidance_scale)


class Metadata(BaseModel):
    """The part of ObjectMeta the models care about; the rest passes through."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 253 or not all(_DNS_LABEL.match(p) for p in value.split("."))):
            raise ValueError("must be a DNS subdomain: lowercase letters, digits, '-' and '.', at most 253 characters")
        return value


class JobMetadata(Metadata):
    """A DiffusionJob's name names its headless Service and prefixes its pods' host names: see JOB_NAME_RULE."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > JOB_NAME_MAX or not re.match(JOB_NAME_PATTERN, value)):
            raise ValueError(JOB_NAME_RULE)
        return value


# --- the plan -------------------------------------------------------------------------------------------


# The plan's models: snake_case in Python and in plan.json (what the worker reads), camelCase in the job's status
# (``DiffusionJobStatus.dump``) like every other API field; either spelling reads back.
PLAN_CONFIG = ConfigDict(extra="forbid", alias_generator=AliasGenerator(alias=to_camel), populate_by_name=True)


class RankPlan(BaseModel):
    """One rank of a plan: its GPU, speed, band of latent rows [start, end) and stride; or an idle rank."""

    model_config = PLAN_CONFIG

    rank: int = Field(ge=0)
    gpu: str
    node: str | None = None
    gpu_index: int | None = None
    speed: float = Field(gt=0)
    rows: tuple[int, int]
    stride: int = Field(1, ge=1)
    branch: Literal["both", "cond", "uncond"] = "both"
    layers: tuple[int, int] | None = Field(
        None, description="Strategy hybrid: the units [start, end) of the linearised denoiser this rank runs in "
        "the pipeline window (start 0: stage 0)."
    )
    uncond_rows: tuple[int, int] | None = Field(
        None, description="Strategy cfg-stride+band, on the cond rank: the band [start, end) of the unconditional "
        "branch's rows it also evaluates once per window (the uncond rank's rows are the rest)."
    )
    predicted_step_ms: float = 0.0
    idle: bool = Field(
        False, description="A process of the gang that computes nothing: the re-plan after warmup left its GPU "
        "out. Its rows are [0, 0); it only joins the gather that ends each image."
    )

    @property
    def height(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def device(self) -> str:
        """Where the rank runs, named as ``Plan.left_out`` names GPUs: ``node/gpu#index``."""
        where = f"{self.node}/" if self.node else ""
        index = f"#{self.gpu_index}" if self.gpu_index is not None else ""
        return f"{where}{self.gpu}{index}"


class HybridPlan(BaseModel):
    """Strategy hybrid's schedule and the cut of the denoiser (the ranks' ``layers`` say who runs what)."""

    model_config = PLAN_CONFIG

    window: int = Field(ge=1)
    slope_threshold: float = Field(ge=0.0)
    pipeline_steps: int = Field(ge=1)
    cap_step: int = Field(ge=0)
    units: int = Field(ge=2, description="Units of the reference denoiser the ranks' layers index.")
    boundary_layer: str = Field(description="The first unit of stage 1, e.g. transformer_blocks.12.")


class Plan(BaseModel):
    """The planner's answer: what every rank does, and what it is predicted to cost."""

    model_config = PLAN_CONFIG

    strategy: Literal["single", "patch", "cfg", "cfg-stride", "cfg-stride+band", "stadi", "stadi+cfg", "hybrid"]
    family: str
    latent_height: int
    latent_width: int
    granularity: int
    steps: int
    guidance: bool
    ranks: list[RankPlan]
    sync_period: int = 1
    warmup_steps: int = 0
    predicted_seconds: float
    alternatives: dict[str, float] = Field(default_factory=dict)
    fidelity: Fidelity | None = Field(
        None, description="The plan's fidelity class: exact, bounded (within the measured bound) or approximate "
        "(None: planned before the classes existed).")
    alternative_fidelity: dict[str, Fidelity] = Field(
        default_factory=dict, description="The fidelity class of each alternative, by strategy.")
    left_out: list[str] = Field(default_factory=list, description="GPUs whose inclusion raised latency.")
    hybrid: HybridPlan | None = None

    @property
    def world_size(self) -> int:
        """Processes of the gang, idle ones included."""
        return len(self.ranks)

    @property
    def active(self) -> list[RankPlan]:
        """The ranks that compute: all but the idle ones."""
        return [r for r in self.ranks if not r.idle]

    def computes_text(self, rank: int) -> bool:
        """Whether ``rank`` computes the text stream: an idle one does not, an active one as ``text_bands`` says of
        its group in band order."""
        me = self.ranks[rank]
        if me.idle:
            return False
        group = sorted((r for r in self.active if r.branch == me.branch), key=lambda r: r.rows[0])
        return text_bands(self.family, [r.stride for r in group])[group.index(me)]

    def validate_for(self, world_size: int | None = None) -> None:
        """Raise ValueError naming the problem when the plan cannot run (bad tiling, granularity, size).

        ``world_size`` counts processes, idle ranks included; the checks of bands and strides apply to the
        active ranks."""
        if world_size is not None and world_size != len(self.ranks):
            raise ValueError(f"plan has {len(self.ranks)} ranks but the world size is {world_size}")
        if [r.rank for r in self.ranks] != list(range(len(self.ranks))):
            raise ValueError("plan ranks must be numbered 0..n-1 in order")
        for r in self.ranks:
            if r.idle and (r.rows != (0, 0) or r.layers is not None):
                raise ValueError(f"idle rank {r.rank} must have rows [0, 0) and no layers; it has rows "
                                 f"{list(r.rows)} and layers {r.layers}")
        active = self.active
        if not active:
            raise ValueError("every rank of the plan is idle; at least one must compute")
        shared = [r for r in active if r.uncond_rows is not None]
        if shared and (self.strategy != "cfg-stride+band" or any(r.branch != "cond" for r in shared)):
            raise ValueError("uncond_rows belong to the cond rank of a cfg-stride+band plan only; ranks "
                             f"{[r.rank for r in shared]} have them in a {self.strategy} plan")
        if self.strategy == "cfg-stride+band" and not shared:
            raise ValueError("a cfg-stride+band plan needs uncond_rows on its cond rank")
        for branch in {r.branch for r in active}:
            bands = sorted([r.rows for r in active if r.branch == branch]
                           + [r.uncond_rows for r in shared if branch == "uncond" and r.uncond_rows is not None])
            cursor = 0
            for start, end in bands:
                if start != cursor or end <= start:
                    raise ValueError(
                        f"bands of branch {branch!r} do not tile [0, {self.latent_height}) exactly once: "
                        f"{bands}"
                    )
                cursor = end
            if cursor != self.latent_height:
                raise ValueError(
                    f"bands of branch {branch!r} end at row {cursor}, not at the latent height "
                    f"{self.latent_height}"
                )
        for r in active:
            for rows in (r.rows, r.uncond_rows or (0, 0)):
                if rows[0] % self.granularity or rows[1] % self.granularity:
                    raise ValueError(
                        f"rank {r.rank} band {list(rows)} is not a multiple of the granularity "
                        f"{self.granularity} latent rows"
                    )
        period = math.lcm(*(r.stride for r in active))
        if self.sync_period != period:
            # the worker runs windows of exactly this period, and the planner priced exactly this one
            raise ValueError(f"sync_period {self.sync_period} is not the lcm of the active ranks' strides "
                             f"{[r.stride for r in active]} ({period})")
        if self.strategy == "hybrid":
            self._validate_hybrid()

    def _validate_hybrid(self) -> None:
        if (self.hybrid is None or len(self.ranks) != 2 or len(self.active) != 2
                or {r.branch for r in self.ranks} != {"cond", "uncond"}):
            raise ValueError("a hybrid plan needs its hybrid schedule and 2 ranks, none idle, one per branch cond "
                             "and uncond")
        cuts = sorted(r.layers or (0, 0) for r in self.ranks)
        units = self.hybrid.units
        if cuts[0][0] != 0 or cuts[0][1] != cuts[1][0] or cuts[1][1] != units or not 0 < cuts[0][1] < units:
            raise ValueError(f"the ranks' layers {cuts} must cut the {units} units in two non-empty stages")


# --- status ---------------------------------------------------------------------------------------------

Phase = Literal["Pending", "Planning", "Queued", "Scheduling", "Running", "Suspended", "Succeeded", "Failed"]


class Condition(Model):
    """A status condition (Kubernetes conventions)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


class Progress(Model):
    """How far the job has come."""

    step: int = 0
    steps: int = 0
    images_done: int = 0
    images_total: int = 0


class RankMeasurement(Model):
    """Measured step times of one rank."""

    rank: int
    step_ms: list[float] = Field(default_factory=list)
    median_ms: float | None = None
    speed: float | None = None


class DiffusionJobStatus(Model):
    """What the operator and the workers report."""

    phase: Phase = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    plan: Plan | None = None
    progress: Progress = Field(default_factory=Progress)
    outputs: list[str] = Field(default_factory=list)
    measured: list[RankMeasurement] = Field(default_factory=list)
    start_time: datetime | None = None
    completion_time: datetime | None = None
    attempts: int = 0
    resumes: int = Field(0, description="Attempts started by a resume (spec.suspend set false): not retries, so "
                         "backoffLimit does not count them.")
    excluded_nodes: list[str] = Field(default_factory=list)
    gpus: int | None = Field(None, ge=0, description="GPUs computing in the current plan (the operator's, then "
                             "the workers' re-plan, which may leave a slow one idle); a printer column.")
    strategy: str | None = Field(None, description="Strategy of the current plan (``plan`` stays the one the gang "
                                 "was started with); a printer column.")
    progress_text: str = Field("", description='Progress for people, e.g. "3/10 images"; a printer column.')
    predicted_text: str = Field("", description='The plan\'s predicted seconds per image for people, e.g. "1.25s"; '
                                'a printer column.')
    nodes_text: str = Field("", description='The planned nodes and their GPUs, e.g. "gpu-a×1, gpu-b×2"; a printer '
                            'column of -o wide.')
    speedup_text: str = Field("", description='The plan\'s predicted seconds per image on one GPU over what the '
                              'workers measured, e.g. "1.84x"; a printer column of -o wide (empty when the plan '
                              'did not weigh one GPU: a strategy named, or gpus.min above 1).')


class DiffusionJob(Model):
    """A batch of images to generate with one diffusion model on a gang of GPUs."""

    api_version: Literal["stadi.dev/v1alpha1"] = API_VERSION
    kind: Literal["DiffusionJob"] = "DiffusionJob"
    metadata: JobMetadata = Field(default_factory=JobMetadata)
    spec: DiffusionJobSpec
    status: DiffusionJobStatus | None = None


# --- GPUNode --------------------------------------------------------------------------------------------


class GpuTelemetry(Model):
    """One GPU as NVML sees it."""

    index: int = Field(ge=0)
    uuid: str
    product: str
    memory_total_mib: int = Field(ge=0)
    memory_used_mib: int = Field(ge=0)
    utilization: float = Field(ge=0.0, le=1.0, description="Fraction of time a kernel ran (NVML).")
    sm_clock_mhz: int = Field(0, ge=0)
    throttle_reasons: list[str] = Field(default_factory=list)
    process_count: int = Field(0, ge=0)
    timestamp: datetime | None = None


class LearnedSpeed(Model):
    """One GPU's speed as a finished job's workers measured it (planner units: an H100 SXM is 1.0, its load
    included), for the next plans of the same kind of job (written by the operator)."""

    index: int = Field(ge=0)
    family: str
    resolution: str = Field(description='The image size, "WIDTHxHEIGHT".')
    compiled: bool = False
    speed: float = Field(gt=0)
    measured_at: datetime
    job: str = Field("", description="namespace/name of the job that measured it.")


class GpuNodeStatus(Model):
    """Telemetry of every GPU of a node (the agent's), and the speeds finished jobs measured on them (the
    operator's)."""

    gpus: list[GpuTelemetry] = Field(default_factory=list)
    updated: datetime | None = None
    nvml: bool = True
    message: str = ""
    learned: list[LearnedSpeed] = Field(default_factory=list, max_length=64)


class GpuNodeSpec(Model):
    """The node this GPUNode describes."""

    node_name: str


class GPUNode(Model):
    """Cluster-scoped: one per GPU node, written by the node agent."""

    api_version: Literal["stadi.dev/v1alpha1"] = API_VERSION
    kind: Literal["GPUNode"] = "GPUNode"
    metadata: Metadata = Field(default_factory=Metadata)
    spec: GpuNodeSpec
    status: GpuNodeStatus | None = None


# --- errors ---------------------------------------------------------------------------------------------


def field_path(parts: Iterable[str | int]) -> str:
    """A field path as Kubernetes writes it: ``spec.prompts[1]``, ``spec.parallelism.gpus.min``."""
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem: the field path in wire (camelCase) form, as the API server writes it, then what
    is allowed."""
    lines = []
    for item in error.errors():
        parts: list[str | int] = [part for part in item["loc"] if not str(part).startswith("function-")]
        cause = (item.get("ctx") or {}).get("error")
        message = item["msg"].removeprefix("Value error, ")
        if isinstance(cause, FieldError):
            parts += cause.field.split(".")
            message = cause.message
        path = field_path(parts)
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "literal_error" and "expected" in item.get("ctx", {}):
            message = f"must be one of {item['ctx']['expected']}"
        lines.append(f"{path}: {message}" if path else message)
    return lines


def load_job(data: dict[str, Any]) -> DiffusionJob:
    """Parse a DiffusionJob document; ValueError lists every bad field by its path."""
    try:
        return DiffusionJob.model_validate(data)
    except ValidationError as error:
        raise ValueError("invalid DiffusionJob: " + "; ".join(describe_errors(error))) from None
