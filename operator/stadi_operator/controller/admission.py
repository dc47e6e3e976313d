"""Admission: a job's spec checked by the pydantic model (the one source of every rule), and the InvalidSpec
verdict."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from stadi.api import API_VERSION, DiffusionJob, load_job
from stadi.families import not_runnable
from stadi_operator.controller.runtime import Job
from stadi_operator.controller.status import stamp

# Worker pod names are `<job>-a<attempt>-<index>` and double as DNS labels (<= 63 characters).
MAX_JOB_NAME = 52


def validate(body: Mapping[str, Any]) -> tuple[DiffusionJob | None, str]:
    """The job parsed by the pydantic model, or None and one line naming every bad field."""
    meta = body.get("metadata") or {}
    name = str(meta.get("name") or "")
    if len(name) > MAX_JOB_NAME or not name[:1].isalpha():
        return None, (f"metadata.name: must start with a letter and have at most {MAX_JOB_NAME} characters "
                      "(it names the job's Service and worker pod hostnames)")
    document = {"apiVersion": API_VERSION, "kind": "DiffusionJob",
                "metadata": {"name": name, "namespace": meta.get("namespace")},
                "spec": copy.deepcopy(dict(body.get("spec") or {}))}
    try:
        job = load_job(document)
    except ValueError as error:
        return None, str(error).removeprefix("invalid DiffusionJob: ")
    why = not_runnable(job.spec.model.family)
    return (None, why) if why else (job, "")


def reject(job: Job, message: str) -> None:
    """An invalid spec is final until the spec changes: no retry loop, one event."""
    st = job.status
    st.set(phase="Failed", observedGeneration=st.generation, completionTime=stamp(job.now))
    st.condition("Valid", "False", "InvalidSpec", message)
    if st.condition("Failed", "True", "InvalidSpec", message):
        job.event("InvalidSpec", message, warning=True)
