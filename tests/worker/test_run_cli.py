"""`stadi run` / `stadi worker` and the job runner: images and manifest into a directory and into a bucket of
a real S3 API (moto on loopback); skipping images already written; a failing rank stops the gang."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from stadi_worker.cli import inputs
from stadi_worker.job.manifest import Manifest
from stadi_worker.job.progress import ProgressEvent
from stadi_worker.job.runner import image_name, run_job
from stadi_worker.job.storage import LocalStore, StorageError, open_store

from stadi.api import load_job
from stadi.planner import Device, plan_job
from tests import s3server
from tests.s3server import client, closed_port, list_keys

s3_endpoint, s3_bucket, s3_env = s3server.s3_endpoint, s3server.s3_bucket, s3server.s3_env

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "manifests" / "examples" / "tiny-sdxl.yaml"
STADI = Path(sys.executable).parent / "stadi"

TINY_JOB = {
    "apiVersion": "stadi.dev/v1alpha1",
    "kind": "DiffusionJob",
    "metadata": {"name": "tiny-test"},
    "spec": {
        "model": {"family": "sdxl", "source": "random://tiny", "dtype": "float32"},
        "prompts": ["a tiny test image", "another tiny test image"],
        "height": 128, "width": 128, "steps": 8, "seed": 0,
        "parallelism": {"strategy": "auto", "gpus": {"max": 2}, "warmupSteps": 2, "minEffectiveSteps": 4},
        "output": {"uri": "file:///tmp/stadi-out"},
    },
}


# --- the job runner with a fake core (fast, no torch.distributed) ----------------------------------------


class FakeImage:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def save(self, buf: io.BytesIO, format: str, **_: Any) -> None:
        buf.write(f"{format}:{self.tag}".encode())


class FakeCore:
    """Stands in for pipelines.load_pipeline and generate.generate; can fail on a chosen prompt."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.generated: list[tuple[str, int]] = []
        self.loads = 0

    def load_pipeline(self, source: Any, device: Any, cache_dir: Path) -> str:
        self.loads += 1
        return "pipe"

    def generate(self, pipe, spec, plan, ctx, prompt, seed, *, exact=False, on_step=None, **_):
        if prompt == self.fail_on:
            raise RuntimeError(f"boom on {prompt}")
        for step in range(1, spec.steps + 1):
            if on_step:
                on_step(step)
        self.generated.append((prompt, seed))
        return SimpleNamespace(image=FakeImage(f"{prompt}/{seed}"), latents=None, step_ms=[1.0] * spec.steps)


def _spec(prompts: list[str], uri: str):
    data = json.loads(json.dumps(TINY_JOB))
    data["spec"]["prompts"] = prompts
    data["spec"]["seed"] = 10
    data["spec"]["output"]["uri"] = uri
    return load_job(data).spec


def _plan(spec):
    return plan_job(spec, [Device("CPU", speed=1.0, index=0)], 20.0)


CTX = SimpleNamespace(rank=0, world_size=1, local_rank=0, device="cpu", backend="gloo")


def test_run_job_writes_images_then_manifest(tmp_path: Path) -> None:
    spec = _spec(["p0", "p1", "p2"], tmp_path.as_uri())
    core, events = FakeCore(), []
    store = LocalStore(tmp_path)
    manifest = run_job(spec, _plan(spec), CTX, store, events.append, job_name="t",
                       load_pipeline=core.load_pipeline, generate=core.generate)
    assert core.generated == [("p0", 10), ("p1", 11), ("p2", 12)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "image-0000.png", "image-0001.png", "image-0002.png", "manifest.json"]
    assert (tmp_path / "image-0001.png").read_bytes() == b"PNG:p1/11"
    on_disk = Manifest.from_json((tmp_path / "manifest.json").read_bytes())
    assert on_disk == manifest
    assert [(i.name, i.seed, i.skipped) for i in on_disk.images] == [
        ("image-0000.png", 10, False), ("image-0001.png", 11, False), ("image-0002.png", 12, False)]
    assert on_disk.ranks[0].step_ms == [1.0] * 24 and on_disk.plan.initial == on_disk.plan.final
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("image") == 3
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 24 and steps[-1].step == 8 and steps[-1].images_done == 2
    assert ProgressEvent.from_json(events[1].to_json()) == events[1]


def test_failure_keeps_written_images_and_restart_skips_them(tmp_path: Path) -> None:
    spec = _spec(["p0", "p1", "p2"], tmp_path.as_uri())
    store = LocalStore(tmp_path)
    with pytest.raises(RuntimeError, match="boom on p1"):
        run_job(spec, _plan(spec), CTX, store, None, load_pipeline=FakeCore("p1").load_pipeline,
                generate=FakeCore("p1").generate)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image-0000.png"]  # written as soon as done

    core, events = FakeCore(), []
    manifest = run_job(spec, _plan(spec), CTX, store, events.append,
                       load_pipeline=core.load_pipeline, generate=core.generate)
    assert core.generated == [("p1", 11), ("p2", 12)]  # image 0 is not regenerated
    assert manifest is not None and [i.skipped for i in manifest.images] == [True, False, False]
    assert events[0].images_skipped == 1 and events[0].images_done == 1

    core = FakeCore()
    run_job(spec, _plan(spec), CTX, store, None, load_pipeline=core.load_pipeline, generate=core.generate)
    assert core.generated == [] and core.loads == 0  # all done: the model is not even loaded


def test_storage_failure_mid_job_keeps_earlier_images(tmp_path: Path) -> None:
    class FlakyStore(LocalStore):
        def put(self, name: str, data: bytes) -> str:
            if name == image_name(1, "png"):
                raise StorageError("cannot write s3://b/x/image-0001.png (endpoint http://x): endpoint unreachable")
            return super().put(name, data)

    spec = _spec(["p0", "p1"], tmp_path.as_uri())
    core = FakeCore()
    with pytest.raises(StorageError, match="endpoint unreachable"):
        run_job(spec, _plan(spec), CTX, FlakyStore(tmp_path), None,
                load_pipeline=core.load_pipeline, generate=core.generate)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image-0000.png"]


def test_prompts_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("first\n\n  second  \n")
    data = json.loads(json.dumps(TINY_JOB))
    del data["spec"]["prompts"]
    data["spec"]["promptsFrom"] = (tmp_path / "prompts.txt").as_uri()
    data["spec"]["output"]["uri"] = (tmp_path / "out").as_uri()
    spec = load_job(data).spec
    core = FakeCore()
    run_job(spec, _plan(spec), CTX, LocalStore(tmp_path / "out"), None,
            load_pipeline=core.load_pipeline, generate=core.generate)
    assert [p for p, _ in core.generated] == ["first", "second"]


# --- worker inputs --------------------------------------------------------------------------------------


def test_worker_reads_plan_and_job_from_env_and_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = load_job(TINY_JOB)
    plan = plan_job(job.spec, [Device("CPU", speed=1.0, index=i) for i in range(2)], 20.0)
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(TINY_JOB))
    monkeypatch.delenv("STADI_PLAN", raising=False)
    monkeypatch.delenv("STADI_JOB", raising=False)
    monkeypatch.setenv("STADI_CONFIG_DIR", str(tmp_path))
    from stadi_worker.settings import WorkerSettings

    def resolve() -> tuple[Any, Any]:
        settings = WorkerSettings()  # the environment, as a rank reads it
        return inputs.resolve_inputs(settings.plan, settings.job, settings.config_dir)

    got_job, got_plan = resolve()
    assert got_plan == plan and got_job.spec == job.spec
    monkeypatch.setenv("STADI_PLAN", plan.model_dump_json())  # inline JSON works too
    assert resolve()[1] == plan
    monkeypatch.setenv("STADI_CONFIG_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv("STADI_PLAN")
    with pytest.raises(inputs.WorkerError, match="no plan"):
        resolve()
    (tmp_path / "bad.json").write_text('{"strategy": "nope"}')
    with pytest.raises(inputs.WorkerError, match="not a valid Plan"):
        inputs.read_plan(str(tmp_path / "bad.json"))


def test_output_override_makes_a_directory_a_file_uri(tmp_path: Path) -> None:
    job = inputs.apply_output_overrides(load_job(TINY_JOB), str(tmp_path / "rel"), None)
    assert job.spec.output.uri == (tmp_path / "rel").as_uri()
    job = inputs.apply_output_overrides(job, "s3://bkt/p", "http://127.0.0.1:9")
    assert (job.spec.output.uri, job.spec.output.endpoint) == ("s3://bkt/p", "http://127.0.0.1:9")


def test_worker_bad_input_fails_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "STADI_PLAN": str(tmp_path / "missing.json"), "STADI_JOB": str(tmp_path / "j.yaml"),
           "TORCHELASTIC_ERROR_FILE": str(tmp_path / "err.json")}
    proc = subprocess.run([str(STADI), "worker"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("stadi worker rank 0: cannot read job")
    assert json.loads((tmp_path / "err.json").read_text())["rank"] == 0


# --- stadi run, end to end (2 Gloo ranks on CPU, tiny random SDXL) ----------------------------------------


@pytest.fixture(scope="module")
def stadi_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """STADI_CACHE shared by the runs of this module: the tiny pipeline is built once."""
    return str(tmp_path_factory.mktemp("stadi-cache"))


def _job_file(tmp_path: Path) -> Path:
    """The bundled example when it is there, else the same job written here."""
    if EXAMPLE.exists():
        return EXAMPLE
    path = tmp_path / "tiny-sdxl.yaml"
    path.write_text(yaml.safe_dump(TINY_JOB))
    return path


def _stadi(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(STADI), *args], env=full_env, capture_output=True, text=True, timeout=timeout)


def _check_pngs(blobs: dict[str, bytes]) -> None:
    from PIL import Image

    for name, data in blobs.items():
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size == (128, 128), name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stadi_run_into_a_directory(tmp_path: Path, stadi_cache: str) -> None:
    out = tmp_path / "out"
    started = time.monotonic()
    proc = _stadi("run", str(_job_file(tmp_path)), "--ranks", "2", "--device", "cpu", "--strategy", "patch",
                  "--output", str(out), env={"STADI_CACHE": stadi_cache})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["image-0000.png", "image-0001.png", "manifest.json"]
    _check_pngs({p.name: p.read_bytes() for p in out.glob("*.png")})
    manifest = Manifest.from_json((out / "manifest.json").read_bytes())
    assert [i.seed for i in manifest.images] == [0, 1] and not any(i.skipped for i in manifest.images)
    assert manifest.plan.initial.strategy == "patch" and len(manifest.ranks) == 2
    assert all(len(r.step_ms) >= 8 for r in manifest.ranks)
    assert str(out) in proc.stdout and "manifest.json" in proc.stdout
    first_run = time.monotonic() - started

    # Run again: both images exist, nothing is regenerated, the manifest records the skips.
    proc = _stadi("run", str(_job_file(tmp_path)), "--ranks", "2", "--device", "cpu", "--strategy", "patch",
                  "--output", out.as_uri(), env={"STADI_CACHE": stadi_cache})
    assert proc.returncode == 0, proc.stderr
    manifest = Manifest.from_json((out / "manifest.json").read_bytes())
    assert all(i.skipped for i in manifest.images), f"first run took {first_run:.1f} s"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stadi_run_into_a_bucket(tmp_path: Path, s3_endpoint: str, s3_bucket: str, stadi_cache: str) -> None:
    proc = _stadi("run", str(_job_file(tmp_path)), "--ranks", "2", "--device", "cpu",
                  "--output", f"s3://{s3_bucket}/jobs/tiny", "--endpoint", s3_endpoint,
                  env={"STADI_CACHE": stadi_cache})
    assert proc.returncode == 0, proc.stderr
    keys = list_keys(s3_endpoint, s3_bucket)
    assert keys == ["jobs/tiny/image-0000.png", "jobs/tiny/image-0001.png", "jobs/tiny/manifest.json"]
    c = client(s3_endpoint)
    blobs = {k: c.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in keys}
    _check_pngs({k: v for k, v in blobs.items() if k.endswith(".png")})
    manifest = Manifest.from_json(blobs["jobs/tiny/manifest.json"])
    assert manifest.output == f"s3://{s3_bucket}/jobs/tiny"
    assert [i.uri for i in manifest.images] == [f"s3://{s3_bucket}/{k}" for k in keys[:2]]
    assert f"s3://{s3_bucket}/jobs/tiny" in proc.stdout


def test_stadi_run_unreachable_endpoint_fails_fast(tmp_path: Path, s3_env: dict[str, str]) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    proc = _stadi("run", str(_job_file(tmp_path)), "--ranks", "2", "--device", "cpu",
                  "--output", "s3://bkt/x", "--endpoint", dead, timeout=120)
    assert proc.returncode == 1
    assert time.monotonic() - started < 60
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("stadi run: cannot open s3://bkt/x") and dead in line and "unreachable" in line


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stadi_run_rank_failure_stops_the_gang(tmp_path: Path) -> None:
    """A rank that fails takes the others down; the error names the rank; nothing hangs."""
    job = json.loads(json.dumps(TINY_JOB))
    job["spec"]["model"]["source"] = (tmp_path / "no-model").as_uri()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    started = time.monotonic()
    proc = _stadi("run", str(path), "--ranks", "2", "--device", "cpu", "--strategy", "patch",
                  "--output", str(tmp_path / "out"), env={"TMPDIR": str(tmp_path)}, timeout=240)
    assert proc.returncode == 1
    assert time.monotonic() - started < 200
    assert "stadi run: rank " in proc.stderr and "failed" in proc.stderr, proc.stderr


def test_stadi_run_bad_job_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"spec": {"model": {"family": "sdxl", "source": "random://tiny"}}}))
    proc = _stadi("run", str(path), "--device", "cpu", timeout=120)
    assert proc.returncode == 1
    assert "invalid DiffusionJob" in proc.stderr and "output" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stadi_run_generates_with_the_tiny_flux_example(tmp_path: Path, stadi_cache: str) -> None:
    """FLUX.1 end to end on the CPU: the tiny example on 2 Gloo ranks, elastic bands and strides (one rank paced
    2x slower), two PNGs and the manifest."""
    out = tmp_path / "out"
    proc = _stadi("run", str(REPO / "manifests" / "examples" / "tiny-flux.yaml"), "--ranks", "2", "--device", "cpu",
                  "--strategy", "stadi", "--slowdown", "1=2", "--output", str(out), env={"STADI_CACHE": stadi_cache})
    assert proc.returncode == 0, proc.stderr
    _check_pngs({p.name: p.read_bytes() for p in out.glob("*.png")})
    manifest = Manifest.from_json((out / "manifest.json").read_bytes())
    assert [i.seed for i in manifest.images] == [0, 1] and manifest.plan.initial.strategy == "stadi"
    assert manifest.plan.initial.family == "flux" and not manifest.plan.initial.guidance
    assert len(manifest.ranks) == 2


def test_open_store_for_run_output_is_checked_first(s3_endpoint: str, s3_env: dict[str, str]) -> None:
    with pytest.raises(StorageError, match="bucket does not exist"):
        open_store("s3://missing-bucket-xyz/out", s3_endpoint)


FAKE_CORE = '''
import os, sys, time, types
from pathlib import Path
from dataclasses import dataclass

@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: object
    backend: str

def init_from_env(device, timeout_s=600.0):
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), 0, torch.device("cpu"), "gloo")

def generate(pipe, spec, plan, ctx, prompt, seed, *, exact=False, on_step=None, **_):
    if ctx.rank == 1:
        raise RuntimeError("rank one broke")
    time.sleep(600)  # rank 0 would wait forever: the launcher must stop it

runtime = types.ModuleType("stadi_worker.engine.runtime")
runtime.init_from_env = init_from_env
runtime.shutdown = lambda ctx, teardown_s=0: None
runtime.DEFAULT_TIMEOUT_S, runtime.TEARDOWN_S = 600.0, 20.0
plan_check = types.ModuleType("stadi_worker.engine.plan_check")
plan_check.check_plan = lambda plan, spec, ctx: plan.validate_for(ctx.world_size)
gen = types.ModuleType("stadi_worker.engine.generate")
gen.generate = generate
loading = types.ModuleType("stadi_worker.job.loading")
loading.load_pipeline = lambda source, device, cache_dir, credentials_dir=None: None
loading.DEFAULT_CACHE, loading.models_dir = Path.home() / ".cache" / "stadi", lambda cache: cache / "models"
bands = types.ModuleType("stadi_worker.engine.bands")
bands.Workspace = lambda options=None: None
sys.modules.update({"stadi_worker.engine.runtime": runtime, "stadi_worker.engine.plan_check": plan_check,
                    "stadi_worker.engine.generate": gen, "stadi_worker.job.loading": loading,
                    "stadi_worker.engine.bands": bands})
'''


@pytest.mark.timeout(180)
def test_stadi_run_one_failed_rank_stops_a_stuck_one(tmp_path: Path) -> None:
    """Rank 1 fails while rank 0 is stuck: the launcher kills rank 0 and reports rank 1's error."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_CORE)  # loaded at start-up of every rank process
    started = time.monotonic()
    proc = _stadi("run", str(_job_file(tmp_path)), "--ranks", "2", "--device", "cpu", "--strategy", "patch",
                  "--output", str(tmp_path / "out"), env={"PYTHONPATH": str(fake), "TMPDIR": str(tmp_path)},
                  timeout=150)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < 90
    assert "stadi run: rank 1 failed: RuntimeError: rank one broke" in proc.stderr
    logs = next(tmp_path.glob("stadi-run-*"))  # kept on failure, and named in the message
    assert str(logs) in proc.stderr and (logs / "rank-1.log").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stadi_run_slowdown_replans(tmp_path: Path, stadi_cache: str) -> None:
    """Two equal CPU ranks plan strides 1; rank 1 paced 3x slower must be relieved by the re-plan (read from
    the recorded plan, not from wall time)."""
    out = tmp_path / "out"
    proc = _stadi("run", str(_job_file(tmp_path)), "--ranks", "2", "--device", "cpu", "--strategy", "stadi",
                  "--slowdown", "1=3.0", "--output", str(out), env={"STADI_CACHE": stadi_cache})
    assert proc.returncode == 0, proc.stderr
    record = Manifest.from_json((out / "manifest.json").read_bytes()).plan
    assert [r.stride for r in record.initial.ranks] == [1, 1]
    assert record.measured_speeds is not None and record.measured_speeds[1] < record.measured_speeds[0]
    assert record.replanned
    r0, r1 = record.final.ranks
    assert r1.stride > r0.stride or r1.height < r0.height


def test_replan_progress_event_round_trips() -> None:
    event = ProgressEvent("replan", 2, 8, 0, 2, speeds=[0.1, 0.03], strategy="stadi", strides=[1, 3],
                          rows=[[0, 12], [12, 16]], replanned=True)
    assert ProgressEvent.from_json(event.to_json()) == event
