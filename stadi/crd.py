"""CustomResourceDefinitions generated from the pydantic models in :mod:`stadi.api`.

pydantic writes JSON Schema 2020-12; a kube-apiserver wants a *structural* OpenAPI v3.0 schema: every node
typed, no ``$ref``/``anyOf``/``allOf``, ``nullable`` instead of a null branch, ``exclusiveMinimum`` as a
flag. :func:`structural` does that conversion and refuses any construct it does not know, so that a model
change that cannot be expressed fails here instead of at ``kubectl apply``.

Cross-field rules the models check in Python are repeated as CEL (``x-kubernetes-validations``) so that the
apiserver rejects such objects naming the field: each rule's ``fieldPath`` is the field the model's
:class:`~stadi.api.FieldError` names, its constants come from :mod:`stadi.api` and :mod:`stadi.families`, and
tests/validation_cases.py runs one table of jobs through pydantic, the operator and a real API server.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from stadi import api
from stadi.families import BUILTIN_MODELS, GUIDANCE_DISTILLED, HYBRID_DEFAULTS, PROFILES

CATEGORY = "stadi"
HEADER = "# Generated from stadi/api.py by `stadi crd` (make crd). Do not edit by hand.\n"

# Keys copied through unchanged (after their values are converted where they hold schemas).
_KEEP = frozenset(
    {
        "type",
        "format",
        "description",
        "default",
        "enum",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "required",
        "nullable",
        "x-kubernetes-validations",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-int-or-string",
    }
)
# Keys that carry no meaning for the apiserver (or that the apiserver refuses) and are dropped.
_DROP = frozenset({"title", "$schema", "examples"})
_INT64_MAX = 2**63 - 1


def _cel_default(value: Any) -> str:
    """A CEL literal of a model default (CEL needs ``5.0`` for a double, ``'x'`` for a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"no CEL literal for {value!r}")


def _field(model: type[BaseModel], name: str, path: str = "self") -> str:
    """CEL for a field that falls back to the model default when absent.

    The apiserver applies schema defaults before it runs the rules, so the fallback only matters for
    objects written before a default existed; it keeps every rule free of "no such key" errors.
    """
    info = model.model_fields[name]
    wire = info.alias or name
    return f"(has({path}.{wire}) ? {path}.{wire} : {_cel_default(info.default)})"


def _cel_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_cel_default(v) for v in values) + "]"


def _granularity_rule(dimension: str) -> dict[str, str]:
    multiples = {family: PROFILES[family].pixel_multiple for family in sorted(PROFILES)}
    table = "{" + ", ".join(f"'{f}': {m}" for f, m in multiples.items()) + "}"
    listed = ", ".join(f"{f} {m}" for f, m in multiples.items())
    value = _field(api.DiffusionJobSpec, dimension)
    return {
        "rule": f"!(self.model.family in {table}) || {value} % {table}[self.model.family] == 0",
        "message": f"spec.{dimension} must be a multiple of the model family's band granularity in pixels "
        f"({listed})",
        "fieldPath": f".{dimension}",
    }


def _cel_rules() -> dict[str, list[dict[str, str]]]:
    """CEL rules by the name of the model (the ``$defs`` key) whose schema node carries them."""
    spec = api.DiffusionJobSpec
    # Optional, defaulting to min(4 or 20, steps): checked only when set.
    warmup = "self.parallelism.warmupSteps"
    min_effective = "self.parallelism.minEffectiveSteps"
    strategy = _field(api.Parallelism, "strategy", "self.parallelism")
    steps = _field(spec, "steps")
    gpus = "self.parallelism.gpus"
    gpu_min = f"(has({gpus}) ? {_field(api.GpuRange, 'min', gpus)} : {api.GpuRange().min})"
    gpu_max = f"(has({gpus}) ? {_field(api.GpuRange, 'max', gpus)} : {api.GpuRange().max})"
    hybrid = f"!has(self.parallelism) || {strategy} != 'hybrid'"
    pair = f"!has(self.parallelism) || !({strategy} in {_cel_list(api.PAIR_STRATEGIES)})"
    builtins = "{" + ", ".join(f"'{name}': '{family}'" for name, family in sorted(BUILTIN_MODELS.items())) + "}"
    return {
        "ModelSource": [
            {
                # an unknown name is the pattern's to refuse: the lookup only runs on a known one
                "rule": f"!self.source.startsWith('builtin://') || !(self.source.substring(10) in {builtins}) || "
                f"{builtins}[self.source.substring(10)] == self.family",
                "message": "spec.model.source: a builtin:// model must be of spec.model.family ("
                + ", ".join(f"{name}: {family}" for name, family in sorted(BUILTIN_MODELS.items())) + ")",
                "fieldPath": ".source",
            }
        ],
        "GpuRange": [
            {
                "rule": f"{_field(api.GpuRange, 'min')} <= {_field(api.GpuRange, 'max')}",
                "message": "spec.parallelism.gpus.min must be <= spec.parallelism.gpus.max",
                "fieldPath": ".min",
            }
        ],
        "DiffusionJobSpec": [
            {
                "rule": "has(self.prompts) != has(self.promptsFrom)",
                "message": "set exactly one of spec.prompts or spec.promptsFrom",
                "fieldPath": ".prompts",
            },
            {
                "rule": f"!has(self.parallelism) || !has({warmup}) || {warmup} <= {steps}",
                "message": "spec.parallelism.warmupSteps must be <= spec.steps",
                "fieldPath": ".parallelism.warmupSteps",
            },
            {
                "rule": f"!has(self.parallelism) || !has({min_effective}) || {min_effective} <= {steps}",
                "message": "spec.parallelism.minEffectiveSteps must be <= spec.steps",
                "fieldPath": ".parallelism.minEffectiveSteps",
            },
            {
                "rule": f"!has(self.parallelism) || !({strategy} in {_cel_list(api.GUIDANCE_SPLITS)}) || "
                f"({_field(spec, 'guidance_scale')} > 1.0 && !(self.model.family in "
                f"{_cel_list(GUIDANCE_DISTILLED)}))",
                "message": f"spec.parallelism.strategy {', '.join(api.GUIDANCE_SPLITS)} split the guidance branches "
                f"and need spec.guidanceScale > 1 and a family that is not guidance-distilled "
                f"({', '.join(GUIDANCE_DISTILLED)})",
                "fieldPath": ".parallelism.strategy",
            },
            {
                "rule": f"{hybrid} || self.model.family in {_cel_list(sorted(HYBRID_DEFAULTS))}",
                "message": "spec.parallelism.strategy hybrid splits the denoiser of "
                f"{' and '.join(sorted(HYBRID_DEFAULTS))} models only",
                "fieldPath": ".parallelism.strategy",
            },
            {
                "rule": f"{pair} || ({gpu_min} <= {api.PAIR_GPUS} && {api.PAIR_GPUS} <= {gpu_max})",
                "message": f"spec.parallelism.gpus must allow {api.PAIR_GPUS}: strategies "
                f"{' and '.join(api.PAIR_STRATEGIES)} run on exactly {api.PAIR_GPUS} GPUs",
                "fieldPath": ".parallelism.gpus",
            },
            {
                "rule": f"!has(self.parallelism) || !has(self.parallelism.hybrid) || "
                f"{strategy} in {_cel_list(api.HYBRID_KNOB_STRATEGIES)}",
                "message": f"spec.parallelism.hybrid applies to strategy {' or '.join(api.HYBRID_KNOB_STRATEGIES)}",
                "fieldPath": ".parallelism.hybrid",
            },
            _granularity_rule("height"),
            _granularity_rule("width"),
        ],
    }


def _root_rules(model: type[BaseModel]) -> list[dict[str, str]]:
    """Rules on the whole object: the model restricts metadata.name further than the apiserver does."""
    if model is not api.DiffusionJob:
        return []
    # The apiserver alone allows any DNS subdomain (dots, 253 characters, a digit first); the job's name also
    # names its Service and prefixes its pods' host names. A rule on metadata cannot carry a fieldPath (the
    # schema declares none of metadata's fields), so the message names it.
    return [
        {
            "rule": f"!has(self.metadata.name) || (size(self.metadata.name) <= {api.JOB_NAME_MAX} && "
            f"self.metadata.name.matches({_cel_default(api.JOB_NAME_PATTERN)}))",
            "message": f"metadata.name {api.JOB_NAME_RULE}",
        }
    ]


def _resolve(ref: str, defs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    prefix = "#/$defs/"
    if not ref.startswith(prefix) or ref[len(prefix) :] not in defs:
        raise ValueError(f"cannot resolve $ref {ref!r}")
    name = ref[len(prefix) :]
    return name, defs[name]


def structural(
    node: dict[str, Any],
    defs: dict[str, Any],
    rules: dict[str, list[dict[str, str]]] | None = None,
    where: str = "",
) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node (and everything under it) to a structural OpenAPI v3 schema.

    ``defs`` is the ``$defs`` table for ``$ref``; ``rules`` maps a ``$defs`` name to CEL rules placed on
    that node; ``where`` is the path used in error messages.
    """
    rules = rules or {}
    node = dict(node)
    rule_list: list[dict[str, str]] = []

    # A $ref (or a one-member allOf around one, as older pydantic writes) becomes the referenced schema
    # inline; sibling keys such as description or default win, as they describe this use of the type.
    if "allOf" in node:
        parts = node.pop("allOf")
        if len(parts) != 1:
            raise ValueError(f"{where}: allOf with {len(parts)} members is not structural")
        node = {**parts[0], **node}
    if "$ref" in node:
        name, target = _resolve(node.pop("$ref"), defs)
        rule_list = rules.get(name, [])
        node = {**target, **node}

    # Optional[X] -> X with nullable: true. Anything else with several branches has no structural form.
    unions = [key for key in ("anyOf", "oneOf") if key in node]
    if len(unions) > 1:
        raise ValueError(f"{where}: both anyOf and oneOf are not structural")
    if unions:
        branches = node.pop(unions[0])
        non_null = [b for b in branches if b != {"type": "null"}]
        if len(non_null) != 1:
            raise ValueError(f"{where}: {unions[0]} of {len(non_null)} non-null types is not structural")
        # The branch is converted on its own; keys beside the union (description, default) override it.
        out = {**structural(non_null[0], defs, rules, where), **_convert(node, defs, rules, where)}
        if len(non_null) < len(branches):
            out["nullable"] = True
    else:
        out = _convert(node, defs, rules, where)
    if "type" not in out:
        out["type"] = _infer_type(out, where)
    if rule_list:
        out["x-kubernetes-validations"] = copy.deepcopy(rule_list)
    return out


def _convert(
    node: dict[str, Any], defs: dict[str, Any], rules: dict[str, list[dict[str, str]]], where: str
) -> dict[str, Any]:
    """Convert the keys of one node (no $ref or union left in it), recursing into sub-schemas."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "properties":
            out[key] = {
                prop: structural(sub, defs, rules, f"{where}.{prop}" if where else prop)
                for prop, sub in value.items()
            }
        elif key == "items":
            out[key] = structural(value, defs, rules, f"{where}[]")
        elif key == "prefixItems":
            # A fixed-length tuple: structural schemas have one item schema, so all members must agree.
            items = [structural(v, defs, rules, f"{where}[]") for v in value]
            if any(item != items[0] for item in items):
                raise ValueError(f"{where}: tuple members of different types are not structural")
            out["items"] = items[0]
            out["minItems"] = len(items)
            out["maxItems"] = len(items)
        elif key == "additionalProperties":
            if value is False:
                # Not allowed beside properties; the apiserver prunes unknown fields instead.
                continue
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            else:
                out[key] = structural(value, defs, rules, f"{where}{{}}")
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # JSON Schema 2020-12 gives the bound; OpenAPI v3.0 wants minimum + a boolean flag.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "default":
            if value is not None:  # default null means "absent"; the apiserver would store the null
                out[key] = copy.deepcopy(value)
        elif key == "maximum" and isinstance(value, int) and value >= _INT64_MAX:
            # The apiserver compares bounds as float64, where 2**63-1 rounds up and wraps to -2**63 (every
            # default then fails); its JSON decoding already stops at int64, so the bound says nothing.
            continue
        elif key in _KEEP:
            out[key] = copy.deepcopy(value)
        else:
            raise ValueError(f"{where or '<root>'}: JSON-schema key {key!r} has no structural equivalent here")
    return out


def _infer_type(out: dict[str, Any], where: str) -> str:
    if out.get("enum"):
        return _json_type(out["enum"][0], where)
    if "properties" in out or "additionalProperties" in out:
        return "object"
    if "items" in out:
        return "array"
    raise ValueError(f"{where or '<root>'}: schema node has no type")


def _json_type(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    raise ValueError(f"{where}: enum value {value!r} has no structural type")


def _default_empty_objects(schema: dict[str, Any]) -> None:
    """Give ``default: {}`` to optional, non-nullable object properties that have no default.

    In the models those are exactly the fields built by a ``default_factory`` (pydantic writes no ``default``
    for them); without ``{}`` the apiserver would not fill their nested defaults as pydantic does.
    """
    for prop, sub in schema.get("properties", {}).items():
        _default_empty_objects(sub)
        if (
            prop not in schema.get("required", [])
            and sub.get("type") == "object"
            and "properties" in sub
            and not sub.get("nullable")
            and "default" not in sub
            and not sub.get("required")
        ):
            sub["default"] = {}
    if isinstance(schema.get("items"), dict):
        _default_empty_objects(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        _default_empty_objects(schema["additionalProperties"])


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural ``openAPIV3Schema`` of a top-level resource model (DiffusionJob or GPUNode)."""
    raw = model.model_json_schema(by_alias=True)
    defs = raw.get("$defs", {})
    rules = _cel_rules()
    props = raw["properties"]
    spec = structural(props["spec"], defs, rules, "spec")
    status = structural(props["status"], defs, rules, "status")
    # The resource's status may be absent, but a status subresource is never null.
    status.pop("nullable", None)
    _default_empty_objects(spec)
    _default_empty_objects(status)
    schema: dict[str, Any] = {
        "type": "object",
        "description": raw.get("description", ""),
        "required": ["spec"],
        "properties": {
            # The apiserver owns these three: metadata's own schema is fixed, only its type may be said.
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    root_rules = _root_rules(model)
    if root_rules:
        schema["x-kubernetes-validations"] = root_rules
    return schema


def _crd(
    model: type[BaseModel],
    plural: str,
    singular: str,
    scope: str,
    short_names: list[str],
    categories: list[str],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    kind = model.__name__
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": short_names,
                "categories": categories,
            },
            "scope": scope,
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": openapi_schema(model)},
                }
            ],
        },
    }


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def build_crds() -> list[dict[str, Any]]:
    """The two CustomResourceDefinitions as objects: DiffusionJob, then GPUNode."""
    diffusionjob = _crd(
        api.DiffusionJob,
        plural="diffusionjobs",
        singular="diffusionjob",
        scope="Namespaced",
        short_names=["dj"],
        categories=["all", CATEGORY],
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Model", "type": "string", "jsonPath": ".spec.model.family"},
            {
                "name": "GPUs",
                "type": "integer",
                "jsonPath": ".status.gpus",
                "description": "GPUs computing in the current plan (a re-plan may leave a slow one idle).",
            },
            {"name": "Strategy", "type": "string", "jsonPath": ".status.strategy"},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progressText"},
            {
                "name": "Predicted",
                "type": "string",
                "jsonPath": ".status.predictedText",
                "description": "Predicted latency of the plan per image.",
            },
            _age(),
            {
                "name": "Nodes",
                "type": "string",
                "jsonPath": ".status.nodesText",
                "description": "The planned nodes and their GPUs.",
                "priority": 1,
            },
            {
                "name": "Speedup",
                "type": "string",
                "jsonPath": ".status.speedupText",
                "description": "Measured speed-up over the predicted time on one GPU.",
                "priority": 1,
            },
        ],
    )
    gpunode = _crd(
        api.GPUNode,
        plural="gpunodes",
        singular="gpunode",
        scope="Cluster",
        short_names=["gpun"],
        categories=[CATEGORY],
        columns=[
            {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
            {"name": "NVML", "type": "boolean", "jsonPath": ".status.nvml"},
            {"name": "Updated", "type": "date", "jsonPath": ".status.updated"},
            _age(),
        ],
    )
    return [diffusionjob, gpunode]


def render_crds() -> dict[str, str]:
    """File name -> YAML text of each CRD; keys sorted, so the output is byte-for-byte stable."""
    return {
        f"{crd['metadata']['name']}.yaml": HEADER
        + yaml.safe_dump(crd, sort_keys=True, default_flow_style=False, allow_unicode=True, width=100)
        for crd in build_crds()
    }


def write_crds(dirs: list[Path]) -> list[Path]:
    """Write the same CRD files into every directory (created if missing); return the paths written."""
    written = []
    files = render_crds()
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = directory / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written
