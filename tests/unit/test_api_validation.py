"""DiffusionJob validation: every bad field gives a message naming the field and what is allowed."""

from __future__ import annotations

import re
from typing import Any

import pytest

from stadi.api import DiffusionJob, field_path, load_job
from tests.validation_cases import DELETE, INVALID, VALID, Invalid, Valid, good_job, names_first, patched


@pytest.mark.parametrize("case", INVALID, ids=[case.id for case in INVALID])
def test_the_model_refuses_each_invalid_job_naming_its_field(case: Invalid) -> None:
    """The shared table (tests/validation_cases.py), through pydantic: the operator and the API server get the
    same jobs."""
    with pytest.raises(ValueError) as info:
        load_job(case.doc)
    message = str(info.value).removeprefix("invalid DiffusionJob: ")
    assert names_first(message, case.field), f"{case.id}: {case.field} not named first in: {message}"
    assert case.says in message, f"{case.id}: got {message}"


@pytest.mark.parametrize("case", VALID, ids=[case.id for case in VALID])
def test_the_model_accepts_each_valid_job(case: Valid) -> None:
    load_job(case.doc)


def test_enough_cases() -> None:
    assert len(INVALID) >= 40 and len(VALID) >= 10
    assert len({case.id for case in [*INVALID, *VALID]}) == len(INVALID) + len(VALID)


@pytest.mark.parametrize(("doc", "message"), [
    (patched(kind="Job"), "kind: must be one of 'DiffusionJob'"),
    (patched(apiVersion="stadi.dev/v1"), "apiVersion: must be one of 'stadi.dev/v1alpha1'"),
], ids=["kind", "api-version"])
def test_not_a_diffusion_job(doc: dict[str, Any], message: str) -> None:
    """What only a file given to `stadi run` can get wrong: to the API server these are other resources."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load_job(doc)


def test_field_paths_are_written_as_kubernetes_writes_them() -> None:
    assert field_path(["spec", "prompts", 1]) == "spec.prompts[1]"
    assert field_path(["spec", "template", "tolerations", 0, "operator"]) == "spec.template.tolerations[0].operator"
    assert field_path([]) == ""


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
    "prompts-from": patched(spec__prompts=DELETE, spec__promptsFrom="file:///data/prompts.txt"),
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
