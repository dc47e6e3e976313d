"""What creating a DiffusionJob may ask for, beyond what the API's types allow: the worker images, the Secrets its
namespace marks for jobs, and the sizes of its untrusted inputs.

The same rules run in three places: the chart's ValidatingAdmissionPolicy (CEL, in the API server), the operator
(before it plans) and the worker (``promptsFrom``, which only the worker can read). This module is the Python
side; ``charts/stadi/templates/admission-policy.yaml`` is the CEL side, and the tests hold the two to the same
table of cases.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

# The Namespace annotation that lists, comma-separated, the Secrets jobs of that namespace may name in
# spec.output.credentialsSecret. On the Namespace, not on the Secret: only whoever may edit the Namespace
# object sets it (not a tenant with rights inside the namespace), and neither the API server's policy nor the
# operator has to read a Secret to check it.
SECRETS_ANNOTATION = "stadi.dev/job-secrets"


class LimitError(ValueError):
    """An input over one of the chart's limits; the message names the field, the size and what is allowed."""


class Limits(BaseModel):
    """The chart's ``limits`` values: the sizes a job's untrusted inputs may have."""

    model_config = ConfigDict(frozen=True)

    max_prompts: int = Field(1000, ge=1, description="Prompts per job, so images per job (one image per prompt).")
    max_prompt_length: int = Field(2000, ge=1, description="Characters of one prompt (or the negative prompt).")
    max_prompts_from_bytes: int = Field(1024 * 1024, ge=1, description="Bytes of the promptsFrom object.")


# The chart value that sets each limit, named in every refusal.
CHART_VALUES = {"max_prompts": "limits.maxPrompts", "max_prompt_length": "limits.maxPromptLength",
                "max_prompts_from_bytes": "limits.maxPromptsFromBytes"}


def _over(field: str, what: str, limit: str, limits: Limits) -> str:
    return f"{field}: {what}; at most {getattr(limits, limit)} allowed (chart value {CHART_VALUES[limit]})"


def prompt_problems(prompts: Sequence[str], limits: Limits, field: str = "spec.prompts",
                    negative: str = "") -> list[str]:
    """One line per limit the prompts break: their count, the longest one's length, the negative prompt's length.
    ``field`` names where they came from (``spec.prompts``, or ``spec.promptsFrom``: ``[i]`` is then the i-th
    non-blank line)."""
    problems = []
    if len(prompts) > limits.max_prompts:
        problems.append(_over(field, f"{len(prompts)} prompts", "max_prompts", limits))
    # The longest prompt only (the first of them): a list of thousands would bury the message, and the API
    # server's policy names the same one.
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]), default=None)
    if longest is not None and len(prompts[longest]) > limits.max_prompt_length:
        length = len(prompts[longest])
        problems.append(_over(f"{field}[{longest}]", f"{length} characters", "max_prompt_length", limits))
    if len(negative) > limits.max_prompt_length:
        problems.append(_over("spec.negativePrompt", f"{len(negative)} characters", "max_prompt_length", limits))
    return problems


def check_prompts_size(size: int, uri: str, limits: Limits) -> None:
    """Raise LimitError when the promptsFrom object is larger than allowed (before it is read)."""
    if size > limits.max_prompts_from_bytes:
        raise LimitError(_over("spec.promptsFrom", f"{uri} is {size} bytes", "max_prompts_from_bytes", limits))


def repository(image: str) -> str:
    """An image reference without its tag and digest: ``registry/path/name``."""
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition(":")
    return head if head and "/" not in tail else name


def image_allowed(image: str, allowed: Iterable[str]) -> bool:
    """Whether ``image`` matches an entry of the allowed list: an entry ending in ``/`` is a prefix (a registry or
    a folder of it); ``sha256:...`` is a digest the reference must pin; anything else is a repository, whose
    tags and digests are allowed (``repo``, ``repo:tag``, ``repo@sha256:...``; never ``repo:5000/other``, a
    registry on a port). References are compared as written: list ``docker.io/library/x`` and ``x`` apart."""
    for entry in allowed:
        if entry.endswith("/"):
            if image.startswith(entry):
                return True
        elif entry.startswith("sha256:"):
            if image.endswith("@" + entry):
                return True
        elif image == entry or (image.startswith((entry + ":", entry + "@")) and "/" not in image[len(entry):]):
            return True
    return False


def secrets_marked(annotations: dict[str, str] | None) -> list[str]:
    """The Secrets a namespace's annotations mark for its jobs."""
    listed = (annotations or {}).get(SECRETS_ANNOTATION, "")
    return [name.strip() for name in listed.split(",") if name.strip()]
