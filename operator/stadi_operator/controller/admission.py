"""Admission: a job's spec checked by the pydantic model (the one source of every rule), what the cluster lets a
job ask for (the chart's limits, worker images and the Secrets its namespace marks: :mod:`stadi.policy`), and the
verdict of a refused job."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from stadi import policy
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


def refusal(job: Job, spec_job: DiffusionJob) -> tuple[str, str] | None:
    """Why the cluster does not run this job (a reason and a message naming the field and what is allowed), or
    None. The second line behind the chart's ValidatingAdmissionPolicy, checked before every attempt, so a
    job stored without the policy, or a Secret's mark withdrawn since, stops before any pod exists.

    The Secret rule reads the job's Namespace (its annotation), never the Secret."""
    spec, runtime = spec_job.spec, job.runtime
    if problems := policy.prompt_problems(spec.prompts or [], runtime.settings.limits,
                                          negative=spec.negative_prompt):
        return "LimitExceeded", "; ".join(problems)
    image = spec.template.image
    if image is not None and not policy.image_allowed(image, runtime.allowed_images):
        return "ImageNotAllowed", (f"spec.template.image: {image} is not an allowed worker image; allowed: "
                                   f"{', '.join(runtime.allowed_images)} (chart value security.allowedImages; "
                                   "an entry ending in / is a prefix)")
    secret = spec.output.credentials_secret
    if secret is not None:
        namespace = job.kube.namespace(job.namespace) or {}
        marked = policy.secrets_marked((namespace.get("metadata") or {}).get("annotations"))
        if secret not in marked:
            return "SecretNotAllowed", (
                f"spec.output.credentialsSecret: Secret {secret} is not marked for jobs in namespace "
                f"{job.namespace}: its annotation {policy.SECRETS_ANNOTATION} lists "
                f"{', '.join(marked) if marked else 'no Secret'}")
    return None


def reject(job: Job, message: str, reason: str = "InvalidSpec") -> None:
    """A refused spec is final until the spec changes: no retry loop, one event."""
    st = job.status
    st.set(phase="Failed", observedGeneration=st.generation, completionTime=stamp(job.now))
    st.condition("Valid", "False", reason, message)
    if st.condition("Failed", "True", reason, message):
        job.event(reason, message, warning=True)
        job.runtime.metrics.failures.labels(reason).inc()
