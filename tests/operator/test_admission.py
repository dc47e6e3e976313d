"""The operator's admission check against the shared table of tests/validation_cases.py: it refuses exactly what
the pydantic model refuses, with the model's message, and accepts the rest."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from stadi_operator.controller.admission import validate

from stadi.api import load_job
from tests.validation_cases import INVALID, VALID, Invalid, Valid, names_first


def as_kopf_sends(doc: dict[str, Any]) -> dict[str, Any]:
    """The document as kopf hands it over: stored metadata and the status the operator itself wrote."""
    body = copy.deepcopy(doc)
    body["metadata"].update(uid="uid-1", generation=1, resourceVersion="7", annotations={"stadi.dev/x": "y"})
    body["status"] = {"phase": "Pending", "conditions": [{"type": "Valid", "status": "Unknown"}]}
    return body


@pytest.mark.parametrize("case", INVALID, ids=[case.id for case in INVALID])
def test_admission_refuses_each_invalid_job_with_the_models_message(case: Invalid) -> None:
    job, message = validate(as_kopf_sends(case.doc))
    assert job is None
    assert names_first(message, case.field), f"{case.id}: {case.field} not named first in: {message}"
    assert case.says in message
    with pytest.raises(ValueError) as model:
        load_job(case.doc)
    assert str(model.value) == f"invalid DiffusionJob: {message}"


@pytest.mark.parametrize("case", VALID, ids=[case.id for case in VALID])
def test_admission_accepts_each_valid_job(case: Valid) -> None:
    job, message = validate(as_kopf_sends(case.doc))
    assert message == ""
    assert job is not None and job.spec == load_job(case.doc).spec
