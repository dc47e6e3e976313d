"""Fixtures shared by every test level."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache dir where ``random://tiny`` pipelines get saved once per session (built on first use)."""
    return tmp_path_factory.mktemp("stadi-models")


@pytest.fixture(scope="session")
def tiny_dir(model_cache: Path):
    """``tiny_dir(family)`` -> the saved tiny pipeline of ``family`` (built in this process, once)."""
    from stadi_worker.job.loading import resolve_source

    from stadi.api import ModelSource

    def get(family: str) -> Path:
        return resolve_source(ModelSource(family=family, source="random://tiny", dtype="float32"), model_cache)

    return get
