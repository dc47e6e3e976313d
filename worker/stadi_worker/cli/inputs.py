"""A rank's inputs: the DiffusionJob and its Plan, from flags, the settings (environment) or the mounted
ConfigMap, with ``--output``/``--endpoint`` applied; every problem a ``WorkerError`` of one line."""

from __future__ import annotations

from pathlib import Path

import yaml

from stadi.api import DiffusionJob, Plan, load_job
from stadi_worker.job.storage import StorageError, local_path


class WorkerError(RuntimeError):
    """Bad worker input (plan, job, environment): reported as one line."""


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (stdlib-style), without the traceback; our own errors without
    their type."""
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    if isinstance(error, WorkerError | StorageError):
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _read_text_or_inline(value: str, what: str) -> str:
    if value.lstrip().startswith("{"):
        return value  # inline JSON (e.g. from a ConfigMap key exposed as an env var)
    try:
        return Path(value).read_text()
    except OSError as error:
        raise WorkerError(f"cannot read {what} {value}: {error.strerror or error}") from None


def read_job(value: str) -> DiffusionJob:
    """A DiffusionJob from a YAML/JSON file path or inline JSON; a bare spec is accepted too."""
    text = _read_text_or_inline(value, "job")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise WorkerError(f"job {value} is not YAML/JSON: {error}") from None
    if not isinstance(data, dict):
        raise WorkerError(f"job {value} must be a DiffusionJob document (a mapping)")
    if "spec" not in data and "model" in data:
        data = {"spec": data}
    try:
        return load_job(data)
    except ValueError as error:
        raise WorkerError(str(error)) from None


def read_plan(value: str) -> Plan:
    """A Plan from a JSON file path or inline JSON."""
    text = _read_text_or_inline(value, "plan")
    try:
        return Plan.model_validate_json(text)
    except ValueError as error:
        first = str(error).splitlines()
        raise WorkerError(f"plan {value} is not a valid Plan: {' '.join(first[:3])}") from None


def _config_file(config_dir: Path, *names: str) -> str | None:
    for name in names:
        if (config_dir / name).is_file():
            return str(config_dir / name)
    return None


def resolve_inputs(plan: str | None, job: str | None, config_dir: Path) -> tuple[DiffusionJob, Plan]:
    """The job and plan from their values (flags, else the settings), else the mounted ConfigMap."""
    plan_src = plan or _config_file(config_dir, "plan.json")
    job_src = job or _config_file(config_dir, "job.yaml", "job.json")
    if not plan_src:
        raise WorkerError(f"no plan: pass --plan FILE, set STADI_PLAN, or mount plan.json in {config_dir}")
    if not job_src:
        raise WorkerError(f"no job: pass --job FILE, set STADI_JOB, or mount job.yaml in {config_dir}")
    return read_job(job_src), read_plan(plan_src)


def apply_output_overrides(job: DiffusionJob, output: str | None, endpoint: str | None) -> DiffusionJob:
    """The job with its output URI/endpoint replaced; a plain directory becomes ``file://``."""
    spec = job.spec.model_copy(deep=True)
    try:
        if output:
            path = local_path(output)
            spec.output.uri = path.resolve().as_uri() if path is not None else output
        if endpoint:
            spec.output.endpoint = endpoint
    except (ValueError, StorageError) as error:
        raise WorkerError(f"--output/--endpoint: {error}") from None
    return job.model_copy(update={"spec": spec})
