"""The generated CRDs: checked-in copies up to date, schemas structural, examples valid against them."""

from __future__ import annotations

import copy
import functools
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from stadi import api
from stadi.crd import build_crds, render_crds, write_crds
from stadi.families import PROFILES
from tests.unit.test_api_validation import GOOD
from tests.validation_cases import INVALID, Invalid

ROOT = Path(__file__).resolve().parents[2]
CRD_DIRS = [ROOT / "manifests" / "crds", ROOT / "charts" / "stadi" / "crds"]
EXAMPLES = ROOT / "manifests" / "examples"
REQUIRED_EXAMPLES = {"sdxl.yaml", "sd3.yaml", "sdxl-patch.yaml", "flux.yaml", "tiny-sdxl.yaml", "tiny-sd3.yaml",
                     "tiny-pixart.yaml", "tiny-flux.yaml"}

TYPES = {"object", "array", "string", "integer", "number", "boolean"}
# JSON-schema constructs a structural schema may not hold (or that the apiserver rejects outright).
FORBIDDEN = {"$ref", "$defs", "$schema", "anyOf", "allOf", "oneOf", "not", "title", "const", "prefixItems",
             "examples", "uniqueItems", "discriminator"}


@functools.cache
def _crds() -> dict[str, dict[str, Any]]:
    return {crd["spec"]["names"]["kind"]: crd for crd in build_crds()}


def crds_by_kind() -> dict[str, dict[str, Any]]:
    """The generated CRDs by kind (a fresh copy: tests may not alter one another's)."""
    return copy.deepcopy(_crds())


def schema_of(kind: str) -> dict[str, Any]:
    return crds_by_kind()[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --- a small checker of the subset of OpenAPI v3 the generated schemas use ------------------------------


def check(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Problems of ``value`` under ``schema`` (types, enums, bounds, patterns, required, unknown fields).

    Unknown fields count as problems: the apiserver would prune them silently, so an example holding one
    would not mean what it says.
    """
    where = path or "<root>"
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null is not allowed"]
    if schema.get("x-kubernetes-preserve-unknown-fields") and "type" not in schema:
        return []
    kind = schema["type"]
    type_ok = {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }[kind]
    if not type_ok:
        return [f"{where}: {value!r} is not of type {kind}"]
    problems: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema:
        low = schema["minimum"]
        if value < low or (schema.get("exclusiveMinimum") and value == low):
            problems.append(f"{where}: {value} is below the minimum {low}")
    if "maximum" in schema:
        high = schema["maximum"]
        if value > high or (schema.get("exclusiveMaximum") and value == high):
            problems.append(f"{where}: {value} is above the maximum {high}")
    if kind == "string":
        if len(value) < schema.get("minLength", 0):
            problems.append(f"{where}: shorter than {schema['minLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if kind == "array":
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            problems.append(f"{where}: {len(value)} items is outside [minItems, maxItems]")
        for i, item in enumerate(value):
            problems += check(item, schema["items"], f"{path}[{i}]")
    if kind == "object":
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{path}.{name}: required" if path else f"{name}: required")
        for name, item in value.items():
            sub = f"{path}.{name}" if path else name
            if not path and name == "metadata":
                continue  # the apiserver validates ObjectMeta itself and never prunes it
            if name in props:
                problems += check(item, props[name], sub)
            elif "additionalProperties" in schema:
                problems += check(item, schema["additionalProperties"], sub)
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{sub}: unknown field (the apiserver would prune it)")
    return problems


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its path."""
    nodes = [(path or "<root>", schema)]
    for name, sub in schema.get("properties", {}).items():
        nodes += walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        nodes += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        nodes += walk(schema["additionalProperties"], f"{path}{{}}")
    return nodes


# --- generated files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", CRD_DIRS, ids=lambda d: str(d.relative_to(ROOT)))
def test_checked_in_crds_match_generator(directory: Path) -> None:
    expected = render_crds()
    present = {p.name for p in directory.glob("*.yaml")}
    assert present == set(expected), f"{directory}: CRD files differ from the generator; run `make crd`"
    for name, text in expected.items():
        assert (directory / name).read_text(encoding="utf-8") == text, (
            f"{directory / name} is stale: it differs from what stadi/api.py generates; run `make crd`"
        )


def test_render_is_stable() -> None:
    assert render_crds() == render_crds()
    assert set(render_crds()) == {"diffusionjobs.stadi.dev.yaml", "gpunodes.stadi.dev.yaml"}


def test_write_crds_writes_every_dir(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b" / "c"]
    written = write_crds(dirs)
    assert len(written) == 4
    for path in written:
        assert path.read_text(encoding="utf-8") == render_crds()[path.name]
    assert {p.parent for p in written} == set(dirs)


def test_files_parse_back_to_the_objects() -> None:
    objects = {f"{crd['metadata']['name']}.yaml": crd for crd in build_crds()}
    for name, text in render_crds().items():
        assert yaml.safe_load(text) == objects[name]


# --- names, scope, versions, columns --------------------------------------------------------------------


def test_diffusionjob_names_and_version() -> None:
    crd = crds_by_kind()["DiffusionJob"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "diffusionjobs.stadi.dev"
    spec = crd["spec"]
    assert spec["group"] == "stadi.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "DiffusionJob",
        "listKind": "DiffusionJobList",
        "plural": "diffusionjobs",
        "singular": "diffusionjob",
        "shortNames": ["dj"],
        "categories": ["all", "stadi"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_gpunode_names_and_version() -> None:
    crd = crds_by_kind()["GPUNode"]
    assert crd["metadata"]["name"] == "gpunodes.stadi.dev"
    assert crd["spec"]["scope"] == "Cluster"
    names = crd["spec"]["names"]
    assert (names["plural"], names["singular"]) == ("gpunodes", "gpunode")
    assert names["shortNames"] == ["gpun"]
    assert names["categories"] == ["stadi"]
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def _resolve(schema: dict[str, Any], json_path: str) -> dict[str, Any]:
    node = schema
    for part in json_path.lstrip(".").split("."):
        node = node["properties"][part]
    return node


def test_diffusionjob_printer_columns() -> None:
    columns = crds_by_kind()["DiffusionJob"]["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [(c["name"], c["type"], c["jsonPath"]) for c in columns] == [
        ("Phase", "string", ".status.phase"),
        ("Model", "string", ".spec.model.family"),
        ("GPUs", "integer", ".status.gpus"),
        ("Strategy", "string", ".status.strategy"),
        ("Progress", "string", ".status.progressText"),
        ("Predicted", "string", ".status.predictedText"),
        ("Age", "date", ".metadata.creationTimestamp"),
        ("Nodes", "string", ".status.nodesText"),
        ("Speedup", "string", ".status.speedupText"),
    ]
    # -o wide only: the planned nodes and the measured speed-up
    assert [c["name"] for c in columns if c.get("priority", 0) == 1] == ["Nodes", "Speedup"]


@pytest.mark.parametrize("kind", ["DiffusionJob", "GPUNode"])
def test_printer_columns_point_at_fields_of_their_type(kind: str) -> None:
    schema = schema_of(kind)
    columns = crds_by_kind()[kind]["spec"]["versions"][0]["additionalPrinterColumns"]
    for column in columns:
        if column["jsonPath"].startswith(".metadata."):
            continue  # metadata belongs to the apiserver
        node = _resolve(schema, column["jsonPath"])
        want = {"date": ("string", "date-time")}.get(column["type"], (column["type"], None))
        assert (node["type"], node.get("format")) == want, column


# --- structural schema ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["DiffusionJob", "GPUNode"])
def test_schema_is_structural(kind: str) -> None:
    schema = schema_of(kind)
    for path, node in walk(schema):
        assert not FORBIDDEN & set(node), f"{path}: holds {FORBIDDEN & set(node)}"
        assert (
            node.get("type") in TYPES
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path}: no type"
        assert node.get("additionalProperties") is not False, f"{path}: additionalProperties: false"
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: both kinds of keys"
        for flag in ("nullable", "exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(flag, False), bool), f"{path}.{flag} must be a boolean (OpenAPI v3.0)"
        for name in node.get("required", []):
            assert name in node["properties"], f"{path}: required {name!r} is not a property"
        for value in node.get("enum", []):
            assert not check(value, {k: v for k, v in node.items() if k != "enum"}), f"{path}: enum {value!r}"
        if "default" in node:
            assert node["default"] is not None, f"{path}: default null"
            assert not check(node["default"], node, path), f"{path}: default does not validate"
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), f"{path}: array without one items schema"


@pytest.mark.parametrize("kind", ["DiffusionJob", "GPUNode"])
def test_apiserver_owned_fields(kind: str) -> None:
    props = schema_of(kind)["properties"]
    assert props["metadata"] == {"type": "object"}
    assert props["apiVersion"] == {"type": "string"}
    assert props["kind"] == {"type": "string"}
    assert schema_of(kind)["required"] == ["spec"]
    assert "nullable" not in props["status"]


def test_schema_conversions() -> None:
    spec = schema_of("DiffusionJob")["properties"]["spec"]["properties"]
    status = schema_of("DiffusionJob")["properties"]["status"]["properties"]
    rank = status["plan"]["properties"]["ranks"]["items"]["properties"]
    # tuple[int, int] -> a two-item integer array
    assert rank["rows"] == {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}
    # gt=0 -> minimum + exclusiveMinimum flag
    assert (rank["speed"]["minimum"], rank["speed"]["exclusiveMinimum"]) == (0, True)
    # dict[str, str] -> a string map
    assert spec["template"]["properties"]["nodeSelector"] == {
        "type": "object",
        "additionalProperties": {"type": "string"},
    }
    # Optional[datetime] -> nullable date-time string
    assert status["startTime"] == {"type": "string", "format": "date-time", "nullable": True}
    # Optional[model] -> the model inline, nullable
    assert status["plan"]["type"] == "object" and status["plan"]["nullable"] is True
    assert spec["steps"]["default"] == 50 and spec["steps"]["minimum"] == 1
    assert spec["parallelism"]["properties"]["strategy"]["default"] == "auto"
    assert spec["parallelism"]["properties"]["strategy"]["enum"] == list(api.STRATEGIES)
    assert "default" not in spec["parallelism"]["properties"]["warmupSteps"]  # min(4, steps) when unset
    assert spec["parallelism"]["default"] == {}  # so the apiserver fills the nested defaults
    assert spec["output"]["properties"]["uri"]["pattern"] == api.OUTPUT_URI_PATTERN
    assert set(schema_of("DiffusionJob")["properties"]["spec"]["required"]) == {"model", "output"}


# --- CEL rules ------------------------------------------------------------------------------------------


def rules_at(schema: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    return {path: node["x-kubernetes-validations"] for path, node in walk(schema)
            if "x-kubernetes-validations" in node}


def test_cel_rules_cover_the_cross_field_checks() -> None:
    rules = rules_at(schema_of("DiffusionJob"))
    assert set(rules) == {"<root>", ".spec", ".spec.model", ".spec.parallelism.gpus"}
    messages = " | ".join(r["message"] for group in rules.values() for r in group)
    for needle in (
        "spec.parallelism.gpus.min must be <= spec.parallelism.gpus.max",
        "exactly one of spec.prompts or spec.promptsFrom",
        "spec.parallelism.warmupSteps must be <= spec.steps",
        "spec.parallelism.minEffectiveSteps must be <= spec.steps",
        "spec.guidanceScale > 1",
        "spec.height must be a multiple",
        "spec.width must be a multiple",
        "metadata.name must be a DNS label",
        "spec.model.source: a builtin:// model must be of spec.model.family",
    ):
        assert needle in messages
    assert rules_at(schema_of("GPUNode")) == {}


def test_cel_rules_name_their_field() -> None:
    """Every rule names its field in its message, and the rules on the spec also in their fieldPath (where the
    API server reports the error); a rule on metadata cannot have one (the schema declares no metadata fields)."""
    for path, group in rules_at(schema_of("DiffusionJob")).items():
        for rule in group:
            assert re.search(r"\b(spec|metadata)\.[a-zA-Z]", rule["message"]), rule
            assert set(rule) == ({"rule", "message"} if path == "<root>" else {"rule", "message", "fieldPath"})
            if path != "<root>":
                assert f"{path.removeprefix('.')}{rule['fieldPath']}" in rule["message"], rule


def test_granularity_rule_uses_every_family() -> None:
    spec_rules = rules_at(schema_of("DiffusionJob"))[".spec"]
    height = next(r for r in spec_rules if r["message"].startswith("spec.height"))
    for family, fam in PROFILES.items():
        assert f"'{family}': {fam.pixel_multiple}" in height["rule"]


# --- examples and specs against the schema --------------------------------------------------------------


def test_required_examples_exist() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} >= REQUIRED_EXAMPLES


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    job = api.load_job(doc)
    assert check(doc, schema_of("DiffusionJob")) == []
    assert job.metadata.name == path.stem
    if path.name.startswith("tiny-"):
        # A CPU runs these in seconds: random tiny weights, small images, few steps, a local output.
        spec = job.spec
        assert spec.model.source == "random://tiny"
        assert spec.height <= 256 and spec.width <= 256 and spec.steps <= 10
        assert spec.output.uri.startswith("file://")


def test_examples_cover_the_asked_configurations() -> None:
    def load(name: str) -> api.DiffusionJob:
        return api.load_job(yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8")))

    sdxl = load("sdxl.yaml").spec
    assert (sdxl.model.family, sdxl.height, sdxl.width, sdxl.steps) == ("sdxl", 1024, 1024, 50)
    assert len(sdxl.prompts or []) == 2 and sdxl.parallelism.gpus.max == 4
    assert sdxl.output.uri.startswith("s3://") and sdxl.output.endpoint and sdxl.output.credentials_secret
    sd3 = load("sd3.yaml").spec
    assert (sd3.model.family, sd3.steps, sd3.scheduler) == ("sd3", 28, "flow-euler")
    assert load("sdxl-patch.yaml").spec.parallelism.strategy == "patch"
    flux = load("flux.yaml").spec
    assert (flux.model.family, flux.steps, flux.guidance_scale, flux.uses_cfg) == ("flux", 28, 3.5, False)
    for name, family in (("tiny-sdxl.yaml", "sdxl"), ("tiny-sd3.yaml", "sd3"), ("tiny-pixart.yaml", "pixart"),
                         ("tiny-flux.yaml", "flux")):
        tiny = load(name).spec
        assert (tiny.model.family, tiny.height, tiny.width, tiny.steps) == (family, 128, 128, 8)
        assert (tiny.parallelism.warmup_steps, tiny.parallelism.min_effective_steps) == (2, 4)
        assert tiny.parallelism.gpus.max == 2 and len(tiny.prompts or []) == 2


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_specs_pass_the_schema(name: str) -> None:
    assert check(GOOD[name], schema_of("DiffusionJob")) == []


FIELD_LEVEL = [case for case in INVALID if case.by == "schema"]
RULE_LEVEL = [case for case in INVALID if case.by == "cel"]


@pytest.mark.parametrize("case", FIELD_LEVEL, ids=[case.id for case in FIELD_LEVEL])
def test_schema_rejects_field_level_errors(case: Invalid) -> None:
    assert check(case.doc, schema_of("DiffusionJob")) != []


def rule_fields() -> set[str]:
    """The fields the CEL rules report errors at: their node plus fieldPath, else the field their message names."""
    return {path.removeprefix(".") + rule["fieldPath"] if "fieldPath" in rule else rule["message"].split()[0]
            for path, group in rules_at(schema_of("DiffusionJob")).items() for rule in group}


@pytest.mark.parametrize("case", RULE_LEVEL, ids=[case.id for case in RULE_LEVEL])
def test_cross_field_errors_pass_the_schema_and_have_a_rule_at_their_field(case: Invalid) -> None:
    """What the shared table says a CEL rule refuses passes the structural schema, and a rule reports that field
    (tests/e2e/test_validation.py checks that the API server does refuse it)."""
    assert check(case.doc, schema_of("DiffusionJob")) == []
    assert case.field in rule_fields()


# The schema-only patterns must accept exactly what the model's validators accept.
PATTERN_SAMPLES = {
    ("model", "source"): [
        "s3://models/sdxl", "file:///models/sdxl", "random://tiny", "random://full", "random://huge",
        "random://tiny/x", "org/name", "stabilityai/stable-diffusion-xl-base-1.0", "name", "ftp://x/y",
        "http://host/model", "/abs/path", "org/name/extra",
    ],
    ("output", "uri"): [
        "s3://bucket/prefix", "s3://bucket", "s3:///prefix", "file:///tmp/out", "file://tmp/out", "ftp://h/x",
        "/tmp/out", "S3://bucket/x",
    ],
    ("output", "endpoint"): ["http://minio:9000", "https://s3.example.com", "minio:9000", "ftp://h"],
}


@pytest.mark.parametrize("field", sorted(PATTERN_SAMPLES), ids=".".join)
def test_patterns_agree_with_validators(field: tuple[str, str]) -> None:
    section, name = field
    node = schema_of("DiffusionJob")["properties"]["spec"]["properties"][section]["properties"][name]
    for sample in PATTERN_SAMPLES[field]:
        doc = {"model": {"family": "sdxl", "source": "random://tiny"}, "prompts": ["p"],
               "output": {"uri": "file:///o"}}
        doc[section] = {**doc[section], name: sample}
        try:
            api.DiffusionJobSpec.model_validate(doc)
            accepted = True
        except ValueError:
            accepted = False
        assert bool(re.search(node["pattern"], sample)) == accepted, f"{section}.{name} = {sample!r}"


def test_status_holds_everything_the_models_hold() -> None:
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    plan = api.Plan(
        strategy="stadi", family="sdxl", latent_height=128, latent_width=128, granularity=4, steps=50,
        guidance=True, sync_period=2, warmup_steps=4, predicted_seconds=1.5,
        alternatives={"patch": 2.0, "stadi": 1.5}, left_out=["T4"],
        ranks=[
            api.RankPlan(rank=0, gpu="H100", node="n0", gpu_index=0, speed=1.0, rows=(0, 80), stride=1,
                         predicted_step_ms=30.0),
            api.RankPlan(rank=1, gpu="L4", node="n1", gpu_index=0, speed=0.2, rows=(80, 128), stride=2,
                         branch="both"),
        ],
    )
    status = api.DiffusionJobStatus(
        phase="Running", observed_generation=2, plan=plan, gpus=2, progress_text="1/2 images",
        progress=api.Progress(step=10, steps=50, images_done=1, images_total=2),
        conditions=[api.Condition(type="Ready", status="False", reason="Running", message="m",
                                  last_transition_time=now, observed_generation=2)],
        outputs=["s3://b/p/0.png"], start_time=now, completion_time=now, attempts=1, excluded_nodes=["x"],
        measured=[api.RankMeasurement(rank=0, step_ms=[30.0, 31.0], median_ms=30.5, speed=1.0)],
    )
    job = api.load_job(GOOD["minimal"]).model_copy(update={"status": status})
    assert check(job.dump(), schema_of("DiffusionJob")) == []


def test_gpunode_round_trip_against_schema() -> None:
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    node = api.GPUNode(
        metadata=api.Metadata(name="gpu-node-1"),
        spec=api.GpuNodeSpec(node_name="gpu-node-1"),
        status=api.GpuNodeStatus(
            updated=now, nvml=True, message="ok",
            gpus=[api.GpuTelemetry(index=0, uuid="GPU-1", product="NVIDIA-H100-80GB-HBM3", memory_total_mib=81559,
                                   memory_used_mib=1024, utilization=0.25, sm_clock_mhz=1980,
                                   throttle_reasons=["SwPowerCap"], process_count=1, timestamp=now)],
        ),
    )
    assert check(node.dump(), schema_of("GPUNode")) == []
    assert check({"spec": {}}, schema_of("GPUNode")) == ["spec.nodeName: required"]
