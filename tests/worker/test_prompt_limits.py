"""The worker's limits on untrusted inputs (issue 20): a ``promptsFrom`` object over the byte limit is refused from
its size (a file's stat, an S3 object's HEAD) and never read into memory; prompts over the count or length limits
are refused naming the field, the size and the chart value; within the limits they load as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from stadi_worker.job.runner import load_prompts
from stadi_worker.job.storage import LocalStore, S3Store
from stadi_worker.settings import WorkerSettings

from stadi.api import DiffusionJobSpec
from stadi.policy import LimitError, Limits
from tests import s3server
from tests.s3server import client

s3_endpoint, s3_bucket, s3_env = s3server.s3_endpoint, s3server.s3_bucket, s3server.s3_env
GIB = 2**30


def spec(prompts_from: str, endpoint: str | None = None, **extra: Any) -> DiffusionJobSpec:
    return DiffusionJobSpec.model_validate({
        "model": {"family": "sdxl", "source": "random://tiny"}, "promptsFrom": prompts_from,
        "output": {"uri": "s3://bucket/out", **({"endpoint": endpoint} if endpoint else {})}, **extra})


def test_a_1_gib_prompts_file_is_refused_from_its_size(tmp_path: Path) -> None:
    big = tmp_path / "prompts.txt"
    with big.open("wb") as fh:
        fh.truncate(GIB)  # sparse: a 1 GiB file that costs no disk, and would cost 1 GiB of memory to read
    with pytest.raises(LimitError) as error:
        load_prompts(spec(big.as_uri()))
    assert str(error.value) == (f"spec.promptsFrom: {big.as_uri()} is {GIB} bytes; at most 1048576 allowed "
                                "(chart value limits.maxPromptsFromBytes)")


class HeadOnly:
    """An S3 client whose object is 1 GiB: a HEAD answers, a GET fails the test."""

    def head_object(self, **_: Any) -> dict[str, Any]:
        return {"ContentLength": GIB}

    def get_object(self, **_: Any) -> dict[str, Any]:
        raise AssertionError("the object was read")


def test_a_1_gib_s3_object_is_refused_without_a_get() -> None:
    data, size = S3Store("bucket", "in", HeadOnly()).get_at_most("prompts.txt", 1024)
    assert (data, size) == (b"", GIB)


def test_s3_prompts_within_and_over_the_limit(s3_endpoint: str, s3_bucket: str) -> None:
    text = "a red fox\n\n  a blue bird  \n"
    client(s3_endpoint).put_object(Bucket=s3_bucket, Key="in/prompts.txt", Body=text.encode())
    job = spec(f"s3://{s3_bucket}/in/prompts.txt", s3_endpoint)
    assert load_prompts(job) == ["a red fox", "a blue bird"]
    assert load_prompts(job, limits=Limits(max_prompts_from_bytes=27)) == ["a red fox", "a blue bird"]
    with pytest.raises(LimitError, match=r"is 27 bytes; at most 26 allowed"):
        load_prompts(job, limits=Limits(max_prompts_from_bytes=26))


def test_a_local_object_over_the_limit_comes_back_unread(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("a\n" * 10)
    assert LocalStore(tmp_path).get_at_most("prompts.txt", 100) == (b"a\n" * 10, 20)
    assert LocalStore(tmp_path).get_at_most("prompts.txt", 8) == (b"", 20)


@pytest.mark.parametrize(("lines", "limits", "message"), [
    (["p"] * 6, Limits(max_prompts=5),
     "spec.promptsFrom: 6 prompts; at most 5 allowed (chart value limits.maxPrompts)"),
    (["p", "q" * 9], Limits(max_prompt_length=8),
     "spec.promptsFrom[1]: 9 characters; at most 8 allowed (chart value limits.maxPromptLength)"),
])
def test_prompts_over_the_count_or_length_limits(tmp_path: Path, lines: list[str], limits: Limits,
                                                 message: str) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines))
    with pytest.raises(LimitError) as error:
        load_prompts(spec(path.as_uri()), limits=limits)
    assert str(error.value) == message


def test_inline_prompts_are_checked_too() -> None:
    job = DiffusionJobSpec.model_validate({"model": {"family": "sdxl", "source": "random://tiny"},
                                           "prompts": ["a", "b", "c"], "output": {"uri": "file:///out"}})
    assert load_prompts(job) == ["a", "b", "c"]
    with pytest.raises(LimitError, match=r"^spec.prompts: 3 prompts; at most 2 allowed"):
        load_prompts(job, limits=Limits(max_prompts=2))


def test_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a cat\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"spec.promptsFrom: .* is not UTF-8 text"):
        load_prompts(spec(path.as_uri()))


def test_the_settings_carry_the_operators_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"STADI_MAX_PROMPTS": "7", "STADI_MAX_PROMPT_LENGTH": "70",
                        "STADI_MAX_PROMPTS_FROM_BYTES": "700"}.items():
        monkeypatch.setenv(name, value)
    assert WorkerSettings().limits == Limits(max_prompts=7, max_prompt_length=70, max_prompts_from_bytes=700)
