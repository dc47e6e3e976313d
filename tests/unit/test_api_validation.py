"""DiffusionJob validation: every bad field gives a message naming the field and what is allowed."""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import pytest

from stadi.api import DiffusionJob, load_job

_DELETE = object()


def good_job() -> dict[str, Any]:
    """A minimal valid DiffusionJob in wire form; every case below breaks exactly one thing of it."""
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
    """good_job() with dotted-path changes applied (``spec__model__family="x"``); _DELETE removes a key."""
    doc = good_job()
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return doc


class Bad(NamedTuple):
    """A bad spec, the substring its error must hold, and whether the CRD schema alone rejects it too."""

    id: str
    doc: dict[str, Any]
    message: str
    schema_rejects: bool = False  # field-level (enum, bounds, pattern, required) rather than a CEL rule


BAD: list[Bad] = [
    Bad(
        "height-granularity",
        patched(spec__height=1000),
        "spec: height 1000 is not a multiple of 32 (the sdxl band granularity",
    ),
    Bad("width-granularity-sd3", patched(spec__model__family="sd3", spec__width=1000), "width 1000 is not a "
        "multiple of 16 (the sd3 band granularity"),
    Bad("height-below-min", patched(spec__height=32), "spec.height: Input should be greater than or equal to 64",
        True),
    Bad("width-above-max", patched(spec__width=16384), "spec.width: Input should be less than or equal to 8192",
        True),
    Bad("steps-zero", patched(spec__steps=0), "spec.steps: Input should be greater than or equal to 1", True),
    Bad("steps-not-int", patched(spec__steps="fifty"), "spec.steps: Input should be a valid integer", True),
    Bad("prompts-empty", patched(spec__prompts=[]), "spec.prompts: must hold at least one prompt", True),
    Bad("prompt-blank", patched(spec__prompts=["ok", "   "]),
        "spec.prompts: prompt 1 is blank; every prompt needs text", True),
    Bad("prompt-empty-string", patched(spec__prompts=[""]),
        "spec.prompts.0: String should have at least 1 character", True),
    Bad("prompts-and-prompts-from", patched(spec__promptsFrom="s3://bucket/prompts.txt"),
        "spec: set exactly one of prompts or promptsFrom"),
    Bad("neither-prompts-nor-prompts-from", patched(spec__prompts=_DELETE),
        "spec: set exactly one of prompts or promptsFrom"),
    Bad("prompts-from-http", patched(spec__prompts=_DELETE, spec__promptsFrom="http://host/prompts.txt"),
        "spec.promptsFrom: must be an s3:// or file:// URI", True),
    Bad("output-uri-ftp", patched(spec__output={"uri": "ftp://host/out"}),
        "spec.output.uri: unsupported output URI 'ftp://host/out'; allowed schemes: s3://, file://", True),
    Bad("output-uri-s3-no-bucket", patched(spec__output={"uri": "s3:///prefix"}),
        "spec.output.uri: s3:// URI needs a bucket: s3://bucket/prefix", True),
    Bad("output-uri-file-relative", patched(spec__output={"uri": "file://out/images"}),
        "spec.output.uri: file:// URI needs an absolute path: file:///path", True),
    Bad("output-endpoint-no-http", patched(spec__output__endpoint="minio.local:9000"),
        "spec.output.endpoint: endpoint must be an http:// or https:// URL", True),
    Bad("output-format", patched(spec__output__format="gif"),
        "spec.output.format: must be one of 'png', 'jpeg' or 'webp'", True),
    Bad("output-missing", patched(spec__output=_DELETE), "spec.output: Field required", True),
    Bad("model-missing", patched(spec__model=_DELETE), "spec.model: Field required", True),
    Bad("family-unknown", patched(spec__model__family="sd4"),
        "spec.model.family: must be one of 'sdxl', 'sd3', 'sd15', 'pixart' or 'flux'", True),
    Bad("dtype-int8", patched(spec__model__dtype="int8"),
        "spec.model.dtype: must be one of 'float16', 'bfloat16' or 'float32'", True),
    Bad("source-random-huge", patched(spec__model__source="random://huge"),
        "spec.model.source: random weights are random://tiny or random://full", True),
    Bad("source-scheme", patched(spec__model__source="ftp://host/weights"),
        "spec.model.source: unsupported scheme 'ftp'; allowed: s3://, file://, random://, or a hub id", True),
    Bad("source-not-hub-id", patched(spec__model__source="stable-diffusion"),
        "spec.model.source: must be s3://…, file://…, random://tiny|full, or a hub id of the form org/name",
        True),
    Bad("strategy-unknown", patched(spec__parallelism={"strategy": "fastest"}),
        "spec.parallelism.strategy: must be one of 'auto', 'single', 'patch', 'cfg', 'stadi', 'stadi+cfg' or "
        "'hybrid'", True),
    Bad("gpus-min-above-max", patched(spec__parallelism={"gpus": {"min": 4, "max": 2}}),
        "spec.parallelism.gpus: min (4) must be <= max (2)"),
    Bad("gpus-min-zero", patched(spec__parallelism={"gpus": {"min": 0}}),
        "spec.parallelism.gpus.min: Input should be greater than or equal to 1", True),
    Bad("max-stride-zero", patched(spec__parallelism={"maxStride": 0}),
        "spec.parallelism.maxStride: Input should be greater than or equal to 1", True),
    Bad("max-stride-above-16", patched(spec__parallelism={"maxStride": 17}),
        "spec.parallelism.maxStride: Input should be less than or equal to 16", True),
    Bad("warmup-above-steps", patched(spec__steps=8, spec__parallelism={"warmupSteps": 10}),
        "spec: parallelism.warmupSteps (10) must be <= steps (8)"),
    Bad("min-effective-above-steps", patched(spec__steps=10, spec__parallelism={"minEffectiveSteps": 20}),
        "spec: parallelism.minEffectiveSteps (20) must be <= steps (10)"),
    Bad("cfg-without-guidance", patched(spec__guidanceScale=1, spec__parallelism={"strategy": "cfg"}),
        "spec: parallelism.strategy 'cfg' splits the guidance branches and needs guidanceScale > 1"),
    Bad("stadi-cfg-without-guidance", patched(spec__guidanceScale=0.5, spec__parallelism={"strategy": "stadi+cfg"}),
        "spec: parallelism.strategy 'stadi+cfg' splits the guidance branches and needs guidanceScale > 1"),
    Bad("hybrid-without-guidance", patched(spec__guidanceScale=1, spec__parallelism={"strategy": "hybrid"}),
        "spec: parallelism.strategy 'hybrid' splits the guidance branches and needs guidanceScale > 1"),
    Bad("hybrid-on-three-gpus", patched(spec__parallelism={"strategy": "hybrid", "gpus": {"min": 3}}),
        "spec: parallelism.strategy 'hybrid' runs on exactly 2 GPUs; parallelism.gpus allows 3 to 8"),
    Bad("hybrid-on-sd15", patched(spec__model__family="sd15", spec__parallelism={"strategy": "hybrid"}),
        "spec: parallelism.strategy 'hybrid' splits the denoiser of sdxl, sd3 models only, not 'sd15'"),
    Bad("hybrid-knobs-under-stadi", patched(spec__parallelism={"strategy": "stadi", "hybrid": {"capStep": 10}}),
        "spec: parallelism.hybrid applies to strategy hybrid or auto, not 'stadi'"),
    Bad("hybrid-window-zero", patched(spec__parallelism={"strategy": "hybrid", "hybrid": {"window": 0}}),
        "spec.parallelism.hybrid.window: Input should be greater than or equal to 1", True),
    Bad("hybrid-unknown-knob", patched(spec__parallelism={"hybrid": {"k": 5}}),
        "spec.parallelism.hybrid.k: unknown field"),
    Bad("guidance-above-max", patched(spec__guidanceScale=101),
        "spec.guidanceScale: Input should be less than or equal to 100", True),
    Bad("seed-negative", patched(spec__seed=-1), "spec.seed: Input should be greater than or equal to 0", True),
    Bad("scheduler-unknown", patched(spec__scheduler="pndm"),
        "spec.scheduler: must be one of 'default', 'ddim', 'euler', 'dpmpp-2m' or 'flow-euler'", True),
    Bad("unknown-spec-field", patched(spec__gpuCount=2), "spec.gpuCount: unknown field"),
    Bad("unknown-nested-field", patched(spec__output__bucket="b"), "spec.output.bucket: unknown field"),
    Bad("snake-case-unknown", patched(spec__parallelism={"warmup_step": 2}),
        "spec.parallelism.warmup_step: unknown field"),
    Bad("metadata-name-uppercase", patched(metadata__name="Bad_Name"),
        "metadata.name: must be a DNS label: lowercase letters, digits and '-', at most 52 characters"),
    Bad("metadata-name-too-long", patched(metadata__name="a" * 53), "metadata.name: must be a DNS label"),
    Bad("kind-wrong", patched(kind="Job"), "kind: must be one of 'DiffusionJob'"),
    Bad("api-version-wrong", patched(apiVersion="stadi.dev/v1"), "apiVersion: must be one of 'stadi.dev/v1alpha1'"),
    Bad("backoff-negative", patched(spec__backoffLimit=-1),
        "spec.backoffLimit: Input should be greater than or equal to 0", True),
    Bad("deadline-zero", patched(spec__activeDeadlineSeconds=0),
        "spec.activeDeadlineSeconds: Input should be greater than or equal to 1", True),
    Bad("toleration-operator", patched(spec__template={"tolerations": [{"key": "gpu", "operator": "In"}]}),
        "spec.template.tolerations.0.operator: must be one of 'Exists' or 'Equal'", True),
]


@pytest.mark.parametrize("case", BAD, ids=[case.id for case in BAD])
def test_bad_spec_names_field_and_what_is_allowed(case: Bad) -> None:
    with pytest.raises(ValueError) as info:
        load_job(case.doc)
    assert case.message in str(info.value), f"{case.id}: got {info.value}"


def test_enough_bad_specs() -> None:
    assert len(BAD) >= 20
    assert len({case.id for case in BAD}) == len(BAD)


def test_every_error_is_listed() -> None:
    doc = patched(spec__steps=0, spec__output={"uri": "ftp://x"}, spec__model__family="sd4")
    with pytest.raises(ValueError) as info:
        load_job(doc)
    text = str(info.value)
    assert text.startswith("invalid DiffusionJob: ")
    for field in ("spec.steps:", "spec.output.uri:", "spec.model.family:"):
        assert field in text


def test_defaults() -> None:
    job = load_job(good_job())
    spec = job.spec
    assert spec.parallelism.strategy == "auto"
    assert spec.parallelism.warmup_steps is None and spec.warmup_steps == 4
    assert spec.parallelism.min_effective_steps is None and spec.min_effective_steps == 20
    assert spec.steps == 50
    assert spec.parallelism.gpus.min == 1
    assert spec.parallelism.gpus.max == 8
    assert spec.output.format == "png"
    assert spec.model.dtype == "float16"
    assert spec.template.gpu_resource == "nvidia.com/gpu"
    assert job.status is None


def test_short_jobs_need_no_tuning() -> None:
    """A 4-step job (a distilled model) is valid with the defaults: warmup and the effective-step floor
    shrink to the job's length instead of failing validation."""
    spec = load_job(patched(spec__steps=4)).spec
    assert (spec.warmup_steps, spec.min_effective_steps) == (4, 4)
    spec = load_job(patched(spec__steps=2)).spec
    assert (spec.warmup_steps, spec.min_effective_steps) == (2, 2)


GOOD: dict[str, dict[str, Any]] = {
    "minimal": good_job(),
    "prompts-from": patched(spec__prompts=_DELETE, spec__promptsFrom="file:///data/prompts.txt"),
    "hub-id": patched(spec__model__source="stabilityai/stable-diffusion-xl-base-1.0"),
    "random-tiny": patched(spec__model__source="random://tiny", spec__height=128, spec__width=128,
                           spec__steps=8, spec__parallelism={"warmupSteps": 2, "minEffectiveSteps": 4}),
    "sd3-16px": patched(spec__model__family="sd3", spec__height=1008, spec__width=784),
    "file-output": patched(spec__output={"uri": "file:///tmp/out", "format": "webp"}),
    "s3-full": patched(spec__output={"uri": "s3://b/p", "endpoint": "https://minio:9000",
                                     "credentialsSecret": "s3"}),
    "cfg": patched(spec__guidanceScale=7.5, spec__parallelism={"strategy": "cfg", "gpus": {"min": 2, "max": 2}}),
    "template": patched(spec__template={"image": "w:1", "nodeSelector": {"a": "b"},
                                        "tolerations": [{"key": "g", "operator": "Exists"}],
                                        "resources": {"limits": {"memory": "32Gi"}}}),
    "status": patched(status={"phase": "Running", "gpus": 2, "progressText": "1/2 images",
                              "startTime": "2025-01-01T00:00:00Z",
                              "conditions": [{"type": "Ready", "status": "False", "reason": "Planning"}]}),
    "hybrid": patched(spec__parallelism={"strategy": "hybrid", "gpus": {"min": 2, "max": 2},
                                         "hybrid": {"window": 10, "slopeThreshold": 0.001, "pipelineSteps": 6,
                                                    "capStep": 20}}),
    "warmup-equals-steps": patched(spec__steps=20, spec__parallelism={"warmupSteps": 20}),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_spec_round_trips(name: str) -> None:
    job = load_job(GOOD[name])
    wire = job.dump()
    assert DiffusionJob.model_validate(wire) == job
    # The wire form is camelCase and parses again through the same entry point users get.
    assert load_job(wire) == job
    assert "apiVersion" in wire and "api_version" not in wire


def test_dump_leaves_unset_optionals_out() -> None:
    wire = load_job(good_job()).dump()
    assert "promptsFrom" not in wire["spec"]
    assert "status" not in wire
    assert wire["spec"]["parallelism"]["strategy"] == "auto"


def test_gpunode_takes_a_node_name_with_dots() -> None:
    """Node names are DNS subdomains (ip-10-0-0-1.ec2.internal); a job name must stay a short DNS label."""
    from stadi.api import GPUNode

    node = GPUNode.model_validate(
        {"metadata": {"name": "ip-10-0-0-1.ec2.internal"}, "spec": {"nodeName": "ip-10-0-0-1.ec2.internal"}}
    )
    assert node.metadata.name == "ip-10-0-0-1.ec2.internal"
    with pytest.raises(ValueError, match="DNS subdomain"):
        GPUNode.model_validate({"metadata": {"name": "Bad_Name"}, "spec": {"nodeName": "x"}})
