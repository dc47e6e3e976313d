"""Admission: a job's spec checked by the pydantic model (the one source of every rule), and the InvalidSpec
verdict."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from stadi.api import API_VERSION, DiffusionJob, load_job
from stadi_operator.controller.runtime import Job
from stadi_operator.controller.status import stamp


def validate(body: Mapping[str, Any]) -> tuple[DiffusionJob | None, str]:
    """The job parsed by the pydantic model, or None and one line naming every bad field.

    Only the name and the spec are checked: the status is the operator's and the workers' own record.
    """
    meta = body.get("metadata") or {}
    document = {"apiVersion": API_VERSION, "kind": "DiffusionJob",
                "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
                "spec": copy.deepcopy(dict(body.get("spec") or {}))}
    try:
        return load_job(document), ""
    except ValueError as error:
        return None, str(error).removeprefix("invalid DiffusionJob: ")


def reject(job: Job, message: str) -> None:
    """An invalid spec is final until the spec changes: no retry loop, one event."""
    st = job.status
    st.set(phase="Failed", observedGeneration=st.generation, completionTime=stamp(job.now))
    st.condition("Valid", "False", "InvalidSpec", message)
    if st.condition("Failed", "True", "InvalidSpec", message):
        job.event("InvalidSpec", message, warning=True)
        job.runtime.metrics.failures.labels("InvalidSpec").inc()
