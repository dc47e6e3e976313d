"""One table of DiffusionJob documents that every validating layer must judge alike.

The pydantic models (``stadi.api.load_job``, tests/unit/test_api_validation.py), the operator's admission check
(``stadi_operator.controller.admission.validate``, tests/operator/test_admission.py) and a real API server with
the generated CRD (``kubectl create --dry-run=server``, tests/e2e/test_validation.py) must each refuse every
``INVALID`` job with an error naming ``field`` (as Kubernetes writes paths: ``spec.prompts[1]``), and accept
every ``VALID`` one. Each invalid job breaks exactly one rule of :func:`good_job`.

Deliberately left out: a family the worker cannot run yet (flux) is a valid DiffusionJob that only the operator
refuses (tests/operator/test_handlers.py), and a wrong kind or apiVersion is not a DiffusionJob for the API
server at all (tests/unit/test_api_validation.py).
"""

from __future__ import annotations

import copy
import re
from typing import Any, NamedTuple

from stadi.api import JOB_NAME_MAX

DELETE = object()


def good_job() -> dict[str, Any]:
    """A minimal valid DiffusionJob in wire form."""
    return {
        "apiVersion": "stadi.dev/v1alpha1",
        "kind": "DiffusionJob",
        "metadata": {"name": "job-1", "namespace": "default"},
        "spec": {
            "model": {"family": "sdxl", "source": "s3://models/stabilityai/stable-diffusion-xl-base-1.0"},
            "prompts": ["a lighthouse at dusk", "a fox in the snow"],
            "height": 1024,
            "width": 1024,
            "output": {"uri": "s3://bucket/prefix"},
        },
    }


def patched(**changes: Any) -> dict[str, Any]:
    """good_job() with dotted-path changes applied (``spec__model__family="x"``); DELETE removes a key."""
    doc = good_job()
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return doc


class Invalid(NamedTuple):
    """A job every layer refuses: the field its error must name, a part of the model's message (the operator
    reports the model's message verbatim; the API server words its own), and what refuses it in the API server:
    the CRD's structural ``schema`` (types, bounds, enums, patterns), one of its ``cel`` rules (stadi.crd), or
    kubectl's ``strict`` field validation (unknown fields)."""

    id: str
    doc: dict[str, Any]
    field: str
    says: str
    by: str = "schema"


class Valid(NamedTuple):
    """A job every layer accepts, most of them on the edge of a rule."""

    id: str
    doc: dict[str, Any]


def names(text: str, field: str) -> bool:
    """Whether ``text`` names ``field`` itself, not a longer path (``spec.prompts`` is not ``spec.promptsFrom``)."""
    return re.search(re.escape(field) + r"(?![\w.\[])", text) is not None


def names_first(message: str, field: str) -> bool:
    """Whether one of the model's ``path: what is allowed`` lines is about ``field``."""
    return re.search(r"(^|; )" + re.escape(field) + ": ", message) is not None


LONGEST_NAME = "job-" + "x" * (JOB_NAME_MAX - 4)
HYBRID_ON_2 = {"strategy": "hybrid", "gpus": {"min": 2, "max": 2}}

INVALID: list[Invalid] = [
    # metadata.name: an RFC 1035 label (it names the job's Service) short enough for its pods' host names
    Invalid("name-leading-digit", patched(metadata__name="1job"), "metadata.name", "a lowercase letter first",
            by="cel"),
    Invalid("name-too-long", patched(metadata__name="a" * (JOB_NAME_MAX + 1)), "metadata.name",
            f"at most {JOB_NAME_MAX} characters", by="cel"),
    Invalid("name-with-dots", patched(metadata__name="job.one"), "metadata.name", "must be a DNS label", by="cel"),
    Invalid("name-uppercase", patched(metadata__name="Bad_Name"), "metadata.name", "must be a DNS label", by="cel"),
    Invalid("name-trailing-dash", patched(metadata__name="job-"), "metadata.name", "ending with a letter or digit",
            by="cel"),
    # size and steps
    Invalid("height-granularity", patched(spec__height=1000), "spec.height",
            "height 1000 is not a multiple of 32 (the sdxl band granularity: 4 latent rows of 8 px)", by="cel"),
    Invalid("width-granularity-sd3", patched(spec__model__family="sd3", spec__width=1000), "spec.width",
            "width 1000 is not a multiple of 16 (the sd3 band granularity", by="cel"),
    Invalid("height-below-min", patched(spec__height=32), "spec.height", "greater than or equal to 64"),
    Invalid("width-above-max", patched(spec__width=16384), "spec.width", "less than or equal to 8192"),
    Invalid("steps-zero", patched(spec__steps=0), "spec.steps", "greater than or equal to 1"),
    Invalid("steps-not-int", patched(spec__steps="fifty"), "spec.steps", "Input should be a valid integer"),
    # prompts
    Invalid("prompts-and-prompts-from", patched(spec__promptsFrom="s3://bucket/prompts.txt"), "spec.prompts",
            "set exactly one of prompts or promptsFrom", by="cel"),
    Invalid("neither-prompts-nor-prompts-from", patched(spec__prompts=DELETE), "spec.prompts",
            "set exactly one of prompts or promptsFrom", by="cel"),
    Invalid("prompts-empty", patched(spec__prompts=[]), "spec.prompts", "must hold at least one prompt"),
    Invalid("prompt-blank", patched(spec__prompts=["ok", "   "]), "spec.prompts[1]",
            "blank; every prompt needs text"),
    Invalid("prompt-empty-string", patched(spec__prompts=[""]), "spec.prompts[0]",
            "String should have at least 1 character"),
    Invalid("prompts-from-http", patched(spec__prompts=DELETE, spec__promptsFrom="http://host/prompts.txt"),
            "spec.promptsFrom", "must be an s3:// or file:// URI"),
    # parallelism
    Invalid("warmup-above-steps", patched(spec__steps=8, spec__parallelism={"warmupSteps": 10}),
            "spec.parallelism.warmupSteps", "must be <= steps (8), got 10", by="cel"),
    Invalid("min-effective-above-steps", patched(spec__steps=10, spec__parallelism={"minEffectiveSteps": 20}),
            "spec.parallelism.minEffectiveSteps", "must be <= steps (10), got 20", by="cel"),
    Invalid("cfg-without-guidance", patched(spec__guidanceScale=1, spec__parallelism={"strategy": "cfg"}),
            "spec.parallelism.strategy", "'cfg' splits the guidance branches and needs guidanceScale > 1", by="cel"),
    Invalid("stadi-cfg-without-guidance",
            patched(spec__guidanceScale=0.5, spec__parallelism={"strategy": "stadi+cfg"}),
            "spec.parallelism.strategy", "'stadi+cfg' splits the guidance branches and needs guidanceScale > 1",
            by="cel"),
    Invalid("hybrid-without-guidance", patched(spec__guidanceScale=1, spec__parallelism=HYBRID_ON_2),
            "spec.parallelism.strategy", "'hybrid' splits the guidance branches and needs guidanceScale > 1",
            by="cel"),
    Invalid("hybrid-on-sd15", patched(spec__model__family="sd15", spec__parallelism={"strategy": "hybrid"}),
            "spec.parallelism.strategy", "'hybrid' splits the denoiser of sdxl, sd3 models only, not 'sd15'", by="cel"),
    Invalid("hybrid-on-three-gpus", patched(spec__parallelism={"strategy": "hybrid", "gpus": {"min": 3}}),
            "spec.parallelism.gpus", "runs on exactly 2 GPUs; min 3 to max 8 does not allow 2", by="cel"),
    Invalid("hybrid-on-one-gpu", patched(spec__parallelism={"strategy": "hybrid", "gpus": {"max": 1}}),
            "spec.parallelism.gpus", "runs on exactly 2 GPUs; min 1 to max 1 does not allow 2", by="cel"),
    Invalid("cfg-stride-on-three-gpus", patched(spec__parallelism={"strategy": "cfg-stride", "gpus": {"min": 3}}),
            "spec.parallelism.gpus", "'cfg-stride' runs on exactly 2 GPUs; min 3 to max 8 does not allow 2",
            by="cel"),
    Invalid("hybrid-knobs-under-patch", patched(spec__parallelism={"strategy": "patch", "hybrid": {"capStep": 10}}),
            "spec.parallelism.hybrid", "applies to strategy hybrid or auto, not 'patch'", by="cel"),
    Invalid("hybrid-knobs-under-stadi", patched(spec__parallelism={"strategy": "stadi", "hybrid": {"window": 3}}),
            "spec.parallelism.hybrid", "applies to strategy hybrid or auto, not 'stadi'", by="cel"),
    Invalid("hybrid-window-zero", patched(spec__parallelism={"strategy": "hybrid", "hybrid": {"window": 0}}),
            "spec.parallelism.hybrid.window", "greater than or equal to 1"),
    Invalid("gpus-min-above-max", patched(spec__parallelism={"gpus": {"min": 4, "max": 2}}),
            "spec.parallelism.gpus.min", "must be <= max (2), got 4", by="cel"),
    Invalid("gpus-min-zero", patched(spec__parallelism={"gpus": {"min": 0}}), "spec.parallelism.gpus.min",
            "greater than or equal to 1"),
    Invalid("strategy-unknown", patched(spec__parallelism={"strategy": "fastest"}), "spec.parallelism.strategy",
            "must be one of 'auto', 'single', 'patch', 'cfg', 'cfg-stride', 'cfg-stride+band', 'stadi', 'stadi+cfg' or "
            "'hybrid'"),
    Invalid("quality-unknown", patched(spec__parallelism={"quality": "best"}), "spec.parallelism.quality",
            "must be one of 'exact', 'balanced' or 'fastest'"),
    Invalid("cfg-stride-band-on-three-gpus",
            patched(spec__parallelism={"strategy": "cfg-stride+band", "gpus": {"min": 3}}), "spec.parallelism.gpus",
            "'cfg-stride+band' runs on exactly 2 GPUs; min 3 to max 8 does not allow 2", by="cel"),
    Invalid("cfg-stride-without-guidance", patched(spec__guidanceScale=1, spec__parallelism={"strategy": "cfg-stride"}),
            "spec.parallelism.strategy", "'cfg-stride' splits the guidance branches and needs guidanceScale > 1",
            by="cel"),
    Invalid("max-stride-zero", patched(spec__parallelism={"maxStride": 0}), "spec.parallelism.maxStride",
            "greater than or equal to 1"),
    Invalid("max-stride-above-16", patched(spec__parallelism={"maxStride": 17}), "spec.parallelism.maxStride",
            "less than or equal to 16"),
    # model
    Invalid("model-missing", patched(spec__model=DELETE), "spec.model", "Field required"),
    Invalid("family-unknown", patched(spec__model__family="sd4"), "spec.model.family",
            "must be one of 'sdxl', 'sd3', 'sd15', 'pixart' or 'flux'"),
    Invalid("dtype-int8", patched(spec__model__dtype="int8"), "spec.model.dtype",
            "must be one of 'float16', 'bfloat16' or 'float32'"),
    Invalid("source-scheme", patched(spec__model__source="ftp://host/weights"), "spec.model.source",
            "unsupported scheme 'ftp'; allowed: s3://, file://, random://, builtin://, or a hub id"),
    Invalid("source-builtin-unknown", patched(spec__model__source="builtin://sdxl-huge"), "spec.model.source",
            "unknown built-in model; allowed: builtin://sdxl-small, builtin://sd3-small"),
    Invalid("source-builtin-other-family", patched(spec__model__source="builtin://sd3-small"), "spec.model.source",
            "builtin://sd3-small is a sd3 model, not sdxl", by="cel"),
    Invalid("source-random-huge", patched(spec__model__source="random://huge"), "spec.model.source",
            "random weights are random://tiny or random://full"),
    Invalid("source-not-hub-id", patched(spec__model__source="stable-diffusion"), "spec.model.source",
            "must be s3://…, file://…, builtin://NAME, random://tiny|full, or a hub id of the form org/name"),
    # output
    Invalid("output-missing", patched(spec__output=DELETE), "spec.output", "Field required"),
    Invalid("output-uri-ftp", patched(spec__output={"uri": "ftp://host/out"}), "spec.output.uri",
            "unsupported output URI 'ftp://host/out'; allowed schemes: s3://, file://"),
    Invalid("output-uri-s3-no-bucket", patched(spec__output={"uri": "s3:///prefix"}), "spec.output.uri",
            "s3:// URI needs a bucket: s3://bucket/prefix"),
    Invalid("output-uri-file-relative", patched(spec__output={"uri": "file://out/images"}), "spec.output.uri",
            "file:// URI needs an absolute path: file:///path"),
    Invalid("output-endpoint-no-http", patched(spec__output__endpoint="minio.local:9000"), "spec.output.endpoint",
            "endpoint must be an http:// or https:// URL"),
    Invalid("output-format", patched(spec__output__format="gif"), "spec.output.format",
            "must be one of 'png', 'jpeg' or 'webp'"),
    # the rest of the spec
    Invalid("guidance-above-max", patched(spec__guidanceScale=101), "spec.guidanceScale", "less than or equal to 100"),
    Invalid("seed-negative", patched(spec__seed=-1), "spec.seed", "greater than or equal to 0"),
    Invalid("scheduler-unknown", patched(spec__scheduler="pndm"), "spec.scheduler",
            "must be one of 'default', 'ddim', 'euler', 'dpmpp-2m' or 'flow-euler'"),
    Invalid("backoff-negative", patched(spec__backoffLimit=-1), "spec.backoffLimit", "greater than or equal to 0"),
    Invalid("deadline-zero", patched(spec__activeDeadlineSeconds=0), "spec.activeDeadlineSeconds",
            "greater than or equal to 1"),
    Invalid("toleration-operator", patched(spec__template={"tolerations": [{"key": "gpu", "operator": "In"}]}),
            "spec.template.tolerations[0].operator", "must be one of 'Exists' or 'Equal'"),
    # unknown fields (the API server refuses them under kubectl's strict field validation)
    Invalid("unknown-spec-field", patched(spec__gpuCount=2), "spec.gpuCount", "unknown field", by="strict"),
    Invalid("unknown-nested-field", patched(spec__output__bucket="b"), "spec.output.bucket", "unknown field",
            by="strict"),
    Invalid("unknown-snake-case", patched(spec__parallelism={"warmup_step": 2}), "spec.parallelism.warmup_step",
            "unknown field", by="strict"),
    Invalid("unknown-hybrid-knob", patched(spec__parallelism={"hybrid": {"k": 5}}), "spec.parallelism.hybrid.k",
            "unknown field", by="strict"),
]

VALID: list[Valid] = [
    Valid("minimal", good_job()),
    Valid("name-one-letter", patched(metadata__name="j")),
    Valid("name-longest", patched(metadata__name=LONGEST_NAME)),
    Valid("name-letter-digit-dash", patched(metadata__name="j1-2x")),
    Valid("prompts-from", patched(spec__prompts=DELETE, spec__promptsFrom="file:///data/prompts.txt")),
    Valid("hub-id", patched(spec__model__source="stabilityai/stable-diffusion-xl-base-1.0")),
    Valid("builtin", patched(spec__model__source="builtin://sdxl-small", spec__height=256, spec__width=256)),
    Valid("builtin-sd3", patched(spec__model__family="sd3", spec__model__source="builtin://sd3-small")),
    Valid("sd3-16px", patched(spec__model__family="sd3", spec__height=1008, spec__width=784)),
    Valid("warmup-equals-steps", patched(spec__steps=20, spec__parallelism={"warmupSteps": 20})),
    Valid("min-effective-equals-steps", patched(spec__steps=20, spec__parallelism={"minEffectiveSteps": 20})),
    Valid("cfg-guidance-just-above-1", patched(spec__guidanceScale=1.01, spec__parallelism={"strategy": "cfg"})),
    Valid("cfg-stride", patched(spec__parallelism={"strategy": "cfg-stride", "quality": "fastest"})),
    Valid("cfg-stride-band", patched(spec__parallelism={"strategy": "cfg-stride+band"})),
    Valid("quality-exact", patched(spec__parallelism={"quality": "exact"})),
    Valid("single-without-guidance", patched(spec__guidanceScale=1, spec__parallelism={"strategy": "single"})),
    Valid("hybrid-gpus-up-to-2", patched(spec__model__family="sd3",
                                         spec__parallelism={"strategy": "hybrid", "gpus": {"min": 1, "max": 2}})),
    Valid("hybrid-knobs-under-auto", patched(spec__parallelism={"hybrid": {"capStep": 10}})),
    Valid("gpus-min-equals-max", patched(spec__parallelism={"gpus": {"min": 3, "max": 3}})),
    Valid("s3-endpoint", patched(spec__output={"uri": "s3://b/p", "endpoint": "http://minio:9000"})),
]
