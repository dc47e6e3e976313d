"""stadi.policy: the image rule against the shared table, the limits' messages (the field, the size, what is
allowed and the chart value), repositories and the Namespace's Secret marks."""

from __future__ import annotations

import pytest

from stadi.policy import (
    SECRETS_ANNOTATION,
    LimitError,
    Limits,
    check_prompts_size,
    image_allowed,
    prompt_problems,
    repository,
    secrets_marked,
)
from tests.policy_cases import ALLOWED, IMAGES


@pytest.mark.parametrize(("image", "allowed"), IMAGES, ids=[image for image, _ in IMAGES])
def test_image_rule(image: str, allowed: bool) -> None:
    assert image_allowed(image, ALLOWED) is allowed


def test_nothing_is_allowed_by_an_empty_list() -> None:
    assert not image_allowed("ghcr.io/stadi-dev/stadi-worker:1", [])


@pytest.mark.parametrize(("image", "repo"), [
    ("ghcr.io/stadi-dev/stadi-worker:0.1.0", "ghcr.io/stadi-dev/stadi-worker"),
    ("registry.local:5000/w", "registry.local:5000/w"),
    ("registry.local:5000/w:2", "registry.local:5000/w"),
    ("w@sha256:" + "b" * 64, "w"),
    ("w:1@sha256:" + "b" * 64, "w"),
])
def test_repository(image: str, repo: str) -> None:
    assert repository(image) == repo


def test_prompt_limits_name_the_field_the_size_and_the_chart_value() -> None:
    limits = Limits(max_prompts=1000, max_prompt_length=10)
    assert prompt_problems(["a"] * 5000, limits) == [
        "spec.prompts: 5000 prompts; at most 1000 allowed (chart value limits.maxPrompts)"]
    assert prompt_problems(["short", "x" * 12, "y" * 30, "z" * 30], limits) == [
        "spec.prompts[2]: 30 characters; at most 10 allowed (chart value limits.maxPromptLength)"]
    assert prompt_problems(["ok"], limits, negative="n" * 11) == [
        "spec.negativePrompt: 11 characters; at most 10 allowed (chart value limits.maxPromptLength)"]
    assert prompt_problems(["x" * 11], limits, field="spec.promptsFrom") == [
        "spec.promptsFrom[0]: 11 characters; at most 10 allowed (chart value limits.maxPromptLength)"]
    assert prompt_problems(["x" * 10] * 1000, limits, negative="n" * 10) == []
    assert prompt_problems([], limits) == []


def test_prompts_size() -> None:
    limits = Limits(max_prompts_from_bytes=100)
    check_prompts_size(100, "s3://b/p.txt", limits)
    with pytest.raises(LimitError, match=r"^spec.promptsFrom: s3://b/p.txt is 1073741824 bytes; at most 100 allowed "
                       r"\(chart value limits.maxPromptsFromBytes\)$"):
        check_prompts_size(2**30, "s3://b/p.txt", limits)


def test_secrets_marked_by_the_namespace() -> None:
    assert secrets_marked({SECRETS_ANNOTATION: " s3-creds, other ,,"}) == ["s3-creds", "other"]
    assert secrets_marked({"something": "else"}) == []
    assert secrets_marked(None) == []
