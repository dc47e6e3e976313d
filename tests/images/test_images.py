"""The operator and worker images, built from their Dockerfiles by ``make images`` (the fixture builds them when
missing or stale: a few minutes), run as their non-root users with ``buildah run``: the commands each ships and,
in the worker image, a tiny job on the CPU. ``STADI_IMAGES=0`` skips them (see README, "Images")."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from stadi_operator.devcluster import images

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 3600  # a cold build (bases, torch, both images) must not be cut off by pytest-timeout's 600 s
TINY_JOB = ROOT / "manifests" / "examples" / "tiny-sdxl.yaml"
CONTAINER_PREFIX = images.TEST_CONTAINER_PREFIX
# Ceilings that catch an image growing by accident (measured: README, "Images").
MAX_BYTES = {images.OPERATOR_IMAGE: 450e6, images.WORKER_IMAGE: 6.5e9}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT)]

Run = Callable[..., subprocess.CompletedProcess[str]]


def skip_reason() -> str | None:
    """Why the images cannot be built here, or None."""
    if os.environ.get("STADI_IMAGES") == "0":
        return "STADI_IMAGES=0: the images are not built"
    missing = images.missing_tools()
    if missing and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        return f"{', '.join(missing)} missing, and no root with apt-get to install them"
    return None


@pytest.fixture(scope="module")
def built() -> dict[str, dict[str, Any]]:
    """Both images built from this tree (and their bases): reference -> base, built, seconds, size."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    return images.prepare(log=print)


def remove_orphans() -> None:
    """Remove the working containers of test sessions that died before their teardown (each a copy of its image
    under vfs: gigabytes), and only those: other sessions may be running next to this one."""
    for name in images.buildah("containers", "--format", "{{.ContainerName}}").split():
        pid = name.removeprefix(CONTAINER_PREFIX).split("-")[0]
        if name.startswith(CONTAINER_PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(images.buildah_cmd("rm", name), capture_output=True)


def container(ref: str) -> Iterator[Run]:
    """``run(*argv, volumes=(), check=True)`` in a working container of ``ref``, as the image's own user."""
    remove_orphans()
    name = f"{CONTAINER_PREFIX}{os.getpid()}-{ref.rsplit('/', 1)[-1].replace(':', '-')}"
    images.buildah("from", "--pull=never", "--name", name, ref)

    def run(*argv: str, volumes: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess[str]:
        mounts = [a for v in volumes for a in ("--volume", v)]
        done = subprocess.run(images.buildah_cmd("run", "--isolation", "chroot", *mounts, name, "--", *argv),
                              capture_output=True, text=True, timeout=600)
        if check:
            assert done.returncode == 0, f"{' '.join(argv)} in {ref}:\n{done.stdout}\n{done.stderr}"
        return done

    try:
        yield run
    finally:
        subprocess.run(images.buildah_cmd("rm", name), capture_output=True)


@pytest.fixture(scope="module")
def operator_image(built: dict[str, dict[str, Any]]) -> Iterator[Run]:
    yield from container(images.OPERATOR_IMAGE)


@pytest.fixture(scope="module")
def worker_image(built: dict[str, dict[str, Any]]) -> Iterator[Run]:
    yield from container(images.WORKER_IMAGE)


def test_the_built_references_are_the_charts_defaults() -> None:
    values = yaml.safe_load((ROOT / "charts" / "stadi" / "values.yaml").read_text())
    version = yaml.safe_load((ROOT / "charts" / "stadi" / "Chart.yaml").read_text())["appVersion"]
    assert f"{values['operator']['image']['repository']}:{version}" == images.OPERATOR_IMAGE
    assert f"{values['agent']['image']['repository']}:{version}" == images.OPERATOR_IMAGE
    assert f"{values['operator']['workerImage']['repository']}:{version}" == images.WORKER_IMAGE


def test_operator_image_runs_its_commands_as_nonroot(operator_image: Run) -> None:
    assert operator_image("id", "-u").stdout.strip() == "65532"
    commands = operator_image("stadi", "--help").stdout
    assert "operator" in commands and "agent" in commands
    assert "worker" not in commands  # no worker package (and no torch) in this image
    operator_image("stadi", "operator", "--help")
    operator_image("stadi", "agent", "--help")
    assert operator_image("python", "-c", "import torch", check=False).returncode != 0


def test_worker_image_runs_its_commands_as_nonroot(worker_image: Run) -> None:
    assert worker_image("id", "-u").stdout.strip() == "1000"
    commands = worker_image("stadi", "--help").stdout
    assert "worker" in commands and "run" in commands
    worker_image("stadi", "worker", "--help")
    version = worker_image("python", "-c", "import torch; print(torch.__version__)").stdout.split()[-1]
    assert version.startswith(images.torch_version())


def test_worker_image_runs_the_tiny_job_on_the_cpu(worker_image: Run, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, 1000, 1000)  # the image's user writes there
    done = worker_image("stadi", "run", "/job/tiny.yaml", "--ranks", "2", "--device", "cpu", "--output", "/out",
                        "--no-progress", volumes=(f"{TINY_JOB}:/job/tiny.yaml:ro", f"{out}:/out"))
    job = yaml.safe_load(TINY_JOB.read_text())
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == len(job["spec"]["prompts"]), (done.stdout, sorted(out.rglob("*")))
    assert all(p.stat().st_size > 0 and p.stat().st_uid == 1000 for p in pngs)


def test_image_sizes(built: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        for ref, entry in built.items():
            print(f"\n[images] {ref}: {entry['size'] / 1e6:,.0f} MB")
    for ref, ceiling in MAX_BYTES.items():
        assert built[ref]["size"] < ceiling, (ref, built[ref]["size"])
