"""The API server rejects invalid DiffusionJobs by the CRD's schema alone (no operator involved), with a message
that names the field: the cases of tests/unit/test_api_validation.py marked ``schema_rejects``."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from types import ModuleType
from typing import Any

import pytest
from test_chart import JOBS_NS, ROOT, Stadi, stadi_fixture  # noqa: F401  (the session fixture "stadi")

pytestmark = pytest.mark.slow


def _unit_cases() -> ModuleType:
    """tests/unit/test_api_validation.py, loaded by path (tests/e2e is not a package, so no relative import)."""
    spec = importlib.util.spec_from_file_location("stadi_e2e_validation_cases",
                                                  ROOT / "tests" / "unit" / "test_api_validation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cases = _unit_cases()
BAD, Bad, good_job = _cases.BAD, _cases.Bad, _cases.good_job

SCHEMA_CASES = [case for case in BAD if case.schema_rejects]


def field_path(case: Bad) -> str:
    """The field as the API server spells it: ``spec.prompts.0`` → ``spec.prompts[0]``. A cross-field message
    of the model (``width 1000 is not a multiple of 16 …``) names its field first: ``spec.width``."""
    path = case.message.split(":", 1)[0] if ":" in case.message else f"spec.{case.message.split()[0]}"
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path)


def create(stadi: Stadi, doc: dict[str, Any], dry_run: bool = True) -> tuple[int, str]:
    body = copy.deepcopy(doc)
    body["metadata"].pop("namespace", None)
    args = ["create", "-n", JOBS_NS, "-f", "-"] + (["--dry-run=server"] if dry_run else [])
    done = stadi.kubectl(*args, input=json.dumps(body), check=False)
    return done.returncode, done.stdout + done.stderr


def test_enough_schema_cases() -> None:
    assert len(SCHEMA_CASES) >= 20


def test_valid_job_is_accepted(stadi: Stadi) -> None:
    code, out = create(stadi, good_job())
    assert code == 0, out


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=[case.id for case in SCHEMA_CASES])
def test_invalid_job_rejected_by_the_schema(stadi: Stadi, case: Bad) -> None:
    code, out = create(stadi, case.doc)
    assert code != 0, f"{case.id}: the API server accepted it"
    assert "is invalid" in out, out
    assert field_path(case) in out, f"{case.id}: {field_path(case)!r} not named in: {out}"


OTHER_CASES = [case for case in BAD if not case.schema_rejects]


def test_every_other_invalid_job_is_refused_by_the_api_or_the_operator(stadi: Stadi) -> None:
    """The cases the schema's field constraints alone need not catch: the API server refuses them (the CRD's CEL
    rules, name rules, unknown fields under kubectl's strict field validation), naming the field; any that gets
    stored must be failed by the operator as InvalidSpec with ``stadi.api.load_job``'s message. (Today the API
    server refuses every one of them.)"""
    stored: dict[str, Bad] = {}
    for i, case in enumerate(OTHER_CASES):
        doc = copy.deepcopy(case.doc)
        if not case.id.startswith("metadata-name"):
            doc["metadata"]["name"] = f"invalid-{i}"
        code, out = create(stadi, doc, dry_run=False)
        if code != 0:
            named = field_path(case)
            if named in ("kind", "apiVersion"):  # kubectl finds no such resource type: nothing to send
                assert "no matches for kind" in out, f"{case.id}: {out}"
            else:
                assert "is invalid" in out or "unknown field" in out, f"{case.id}: {out}"
                assert named in out, f"{case.id}: {named!r} not named in: {out}"
        else:
            stored[doc["metadata"]["name"]] = case
    try:
        def failed(name: str) -> dict[str, Any] | None:
            st = stadi.cluster.kubectl_json("get", "dj", name, "-n", JOBS_NS).get("status") or {}
            return st if st.get("phase") == "Failed" else None

        for name, case in stored.items():
            stadi.cluster.wait_for(lambda name=name: failed(name) is not None, 60, f"{case.id}: phase Failed")
            st = failed(name)
            assert st is not None
            valid = {c["type"]: c for c in st["conditions"]}["Valid"]
            assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
            assert case.message in valid["message"], f"{case.id}: {valid['message']}"
            assert stadi.kubectl("get", "pods", "-n", JOBS_NS, "-l", f"stadi.dev/job={name}", "-o", "name"
                                 ).stdout.strip() == ""
    finally:
        for name in stored:
            stadi.kubectl("delete", "dj", name, "-n", JOBS_NS, "--wait=false", check=False)
