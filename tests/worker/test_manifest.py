"""manifest.json: the pydantic model round-trips through JSON; versions and per-rank records are filled."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from stadi_worker.job.manifest import (
    ImageRecord,
    Manifest,
    PlanRecord,
    RankRecord,
    Timings,
    Versions,
    now,
)

from stadi.api import load_job
from stadi.planner import Device, plan_job


def _spec():
    return load_job({"spec": {
        "model": {"family": "sdxl", "source": "random://tiny", "dtype": "float32"},
        "prompts": ["a", "b"], "height": 128, "width": 128, "steps": 8,
        "parallelism": {"warmupSteps": 2, "minEffectiveSteps": 4, "strategy": "patch"},
        "output": {"uri": "s3://bucket/out"},
    }}).spec


def _manifest() -> Manifest:
    spec = _spec()
    plan = plan_job(spec, [Device("CPU", speed=1.0, index=i) for i in range(2)], 20.0)
    return Manifest(
        job="tiny", model=spec.model, output="s3://bucket/out", format="png", height=128, width=128,
        steps=8, guidance_scale=5.0, scheduler="default", seed=7,
        images=[
            ImageRecord(index=0, prompt="a", seed=7, name="image-0000.png", uri="s3://bucket/out/image-0000.png",
                        seconds=1.5),
            ImageRecord(index=1, prompt="b", seed=8, name="image-0001.png", uri="s3://bucket/out/image-0001.png",
                        skipped=True),
        ],
        plan=PlanRecord(initial=plan, final=plan),
        ranks=[RankRecord.measure(0, "CPU", [3.0, 1.0, 2.0], host="h0"),
               RankRecord.measure(1, "CPU", [], host="h0")],
        timings=Timings(load_s=1.0, generate_s=2.0, write_s=0.1, total_s=3.2, started=now(), finished=now()),
        versions=Versions.current(),
    )


def test_manifest_round_trip() -> None:
    manifest = _manifest()
    data = manifest.to_json()
    assert data.endswith(b"\n")
    again = Manifest.from_json(data)
    assert again == manifest
    assert again.to_json() == data
    doc = json.loads(data)
    assert doc["schema_version"] == 1
    assert doc["plan"]["initial"] == doc["plan"]["final"]
    assert [r["rank"] for r in doc["plan"]["initial"]["ranks"]] == [0, 1]


def test_rank_record_median_and_versions() -> None:
    m = _manifest()
    assert m.ranks[0].median_step_ms == 2.0
    assert m.ranks[1].median_step_ms is None
    assert m.versions.python.count(".") == 2
    assert m.versions.torch and m.versions.diffusers and m.versions.stadi


def test_manifest_rejects_unknown_fields() -> None:
    doc = json.loads(_manifest().to_json())
    doc["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        Manifest.model_validate(doc)
