"""The API server with the generated CRD against the shared table of tests/validation_cases.py: it refuses every
invalid DiffusionJob naming the same field as the pydantic model and the operator's admission check (the CRD's
schema, its CEL rules, kubectl's strict field validation), and accepts every valid one; ``kubectl create
--dry-run=server`` runs the whole admission chain and stores nothing. Then a stored FLUX.1 job, admitted and
planned by the operator."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from test_chart import JOBS_NS, Stadi, stadi_fixture  # noqa: F401  (the session fixture "stadi")

from tests.validation_cases import INVALID, VALID, Invalid, Valid, names, patched

pytestmark = pytest.mark.slow


def create(stadi: Stadi, doc: dict[str, Any]) -> tuple[int, str]:
    body = copy.deepcopy(doc)
    body["metadata"].pop("namespace", None)
    done = stadi.kubectl("create", "-n", JOBS_NS, "--dry-run=server", "-f", "-", input=json.dumps(body), check=False)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("case", INVALID, ids=[case.id for case in INVALID])
def test_the_api_server_refuses_each_invalid_job_naming_its_field(stadi: Stadi, case: Invalid) -> None:
    code, out = create(stadi, case.doc)
    assert code != 0, f"{case.id}: the API server accepted it"
    assert ("strict decoding error: unknown field" if case.by == "strict" else "is invalid") in out, out
    assert names(out, case.field), f"{case.id}: {case.field!r} not named in: {out}"


@pytest.mark.parametrize("case", VALID, ids=[case.id for case in VALID])
def test_the_api_server_accepts_each_valid_job(stadi: Stadi, case: Valid) -> None:
    code, out = create(stadi, case.doc)
    assert code == 0, f"{case.id}: {out}"


def test_the_operator_admits_and_plans_a_flux_job(stadi: Stadi) -> None:
    """A FLUX.1 job (guidance-distilled) is stored, admitted and planned with one branch per step."""
    doc = patched(metadata__name="flux-job", spec__model__family="flux", spec__guidanceScale=3.5)
    code, out = create(stadi, doc)
    assert code == 0, out
    doc["metadata"].pop("namespace")
    stadi.kubectl("create", "-n", JOBS_NS, "-f", "-", input=json.dumps(doc))
    try:
        def status() -> dict[str, Any]:
            return dict(stadi.cluster.kubectl_json("get", "dj", "flux-job", "-n", JOBS_NS).get("status") or {})

        stadi.cluster.wait_for(lambda: bool(status().get("plan")), 60, "flux-job planned")
        valid = {c["type"]: c for c in status()["conditions"]}["Valid"]
        assert valid["status"] == "True", valid
        plan = status()["plan"]
        assert plan["family"] == "flux" and plan["guidance"] is False
        assert {r["branch"] for r in plan["ranks"]} == {"both"}
    finally:
        stadi.kubectl("delete", "dj", "flux-job", "-n", JOBS_NS, "--wait=false", check=False)
