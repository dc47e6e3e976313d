"""Tiny random pipelines: built offline, saved, loaded back with from_pretrained; schedulers; sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import job_spec
from stadi_worker.engine.serial import generate_serial
from stadi_worker.job.loading import load_pipeline
from stadi_worker.models import ops_for
from stadi_worker.models.schedulers import make_scheduler

from stadi.api import DiffusionJobSpec, ModelSource


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_dir, model_cache: Path):
    tiny_dir("sdxl")
    torch.set_num_threads(1)
    return load_pipeline(ModelSource(family="sdxl", source="random://tiny", dtype="float32"), "cpu", model_cache)


def test_pipelines_tiny_sdxl_on_disk(tiny_dir) -> None:
    path = tiny_dir("sdxl")
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert (path / "tokenizer" / "vocab.json").exists() and (path / "tokenizer" / "merges.txt").exists()
    unet = json.loads((path / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and len(unet["down_block_types"]) == 3
    assert json.loads((path / "text_encoder_2" / "config.json").read_text())["architectures"] == [
        "CLIPTextModelWithProjection"]


def test_pipelines_load_from_file_uri(tiny_dir, tmp_path: Path) -> None:
    pipe = load_pipeline(ModelSource(family="sdxl", source=f"file://{tiny_dir('sdxl')}", dtype="float32"),
                         "cpu", tmp_path)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.tokenizer("a cat").input_ids[0] == pipe.tokenizer.bos_token_id
    assert not list(tmp_path.iterdir())  # a local directory is used in place, nothing cached


def test_pipelines_s3_goes_through_storage(tiny_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def download_prefix(uri: str, dest: Path, endpoint: str | None, credentials_dir: Path | None) -> Path:
        calls.append((uri, dest, endpoint))
        return tiny_dir("sdxl")

    from stadi_worker.job import loading

    monkeypatch.setattr(loading, "download_prefix", download_prefix)
    pipe = load_pipeline(ModelSource(family="sdxl", source="s3://models/tiny-sdxl", dtype="float32"), "cpu",
                         tmp_path, endpoint="http://127.0.0.1:9000")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    (uri, dest, endpoint), = calls
    assert uri == "s3://models/tiny-sdxl" and endpoint == "http://127.0.0.1:9000"
    assert dest.is_relative_to(tmp_path)


def test_pipelines_scheduler_choice(sdxl_pipe) -> None:
    names = {n: type(make_scheduler(ops_for(sdxl_pipe, "sdxl"), n)).__name__ for n in ("default", "ddim", "euler",
                                                                               "dpmpp-2m")}
    assert names == {"default": "EulerDiscreteScheduler", "ddim": "DDIMScheduler",
                     "euler": "EulerDiscreteScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler"}
    with pytest.raises(ValueError, match="flow-euler is for flow-matching"):
        make_scheduler(ops_for(sdxl_pipe, "sdxl"), "flow-euler")


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_pipelines_serial_generation(sdxl_pipe, scheduler: str) -> None:
    spec = DiffusionJobSpec.model_validate(job_spec("sdxl", steps=3, scheduler=scheduler))
    seen = []
    res = generate_serial(sdxl_pipe, spec, "a lighthouse", 1, on_step=lambda i, n: seen.append((i, n)))
    assert res.image is not None and res.image.size == (spec.width, spec.height)
    assert res.latents is not None and torch.isfinite(res.latents).all()
    assert seen == [(1, 3), (2, 3), (3, 3)] and len(res.step_ms) == 3


def test_pipelines_tiny_sd15_and_sd3(tiny_dir, model_cache: Path) -> None:
    for family, cls, sched in (("sd15", "StableDiffusionPipeline", "DDIMScheduler"),
                               ("sd3", "StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler")):
        tiny_dir(family)
        pipe = load_pipeline(ModelSource(family=family, source="random://tiny", dtype="float32"), "cpu",
                             model_cache)
        assert type(pipe).__name__ == cls
        assert type(make_scheduler(ops_for(pipe, family), "default")).__name__ == sched
        spec = DiffusionJobSpec.model_validate(job_spec(family, steps=2))
        res = generate_serial(pipe, spec, "a boat", 0)
        assert res.latents is not None and torch.isfinite(res.latents).all()
    with pytest.raises(ValueError, match="flow-matching model"):
        make_scheduler(ops_for(pipe, "sd3"), "ddim")


def test_pipelines_tiny_pixart(tiny_dir, model_cache: Path) -> None:
    """PixArt-alpha from disk (T5 tokenizer from its tokenizer.json): our loop equals diffusers' own
    ``__call__`` on the same noise, also with the size micro-conditions of a sample_size 128 transformer."""
    from diffusers import PixArtTransformer2DModel
    from stadi_worker.engine.sampling import initial_noise

    path = tiny_dir("pixart")
    assert json.loads((path / "model_index.json").read_text())["tokenizer"] == ["transformers", "T5Tokenizer"]
    pipe = load_pipeline(ModelSource(family="pixart", source="random://tiny", dtype="float32"), "cpu", model_cache)
    assert type(pipe).__name__ == "PixArtAlphaPipeline"
    assert type(make_scheduler(ops_for(pipe, "pixart"), "default")).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.tokenizer("a cat").input_ids[-1] == pipe.tokenizer.eos_token_id
    for height, width, sample_size in ((128, 128, 16), (128, 256, 128)):
        if sample_size != pipe.transformer.config.sample_size:
            torch.manual_seed(0)
            pipe.transformer = PixArtTransformer2DModel.from_config({**pipe.transformer.config,
                                                                     "sample_size": sample_size})
        spec = DiffusionJobSpec.model_validate(job_spec("pixart", steps=3, height=height, width=width,
                                                        negativePrompt="blurry"))
        ours = generate_serial(pipe, spec, "a boat", 0)
        assert ours.image is not None and ours.image.size == (width, height)
        theirs = pipe("a boat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=spec.guidance_scale,
                      height=height, width=width, latents=initial_noise((4, height // 8, width // 8), 0, 1.0),
                      output_type="latent", use_resolution_binning=False, clean_caption=False).images
        assert torch.allclose(ours.latents, theirs, rtol=1e-5, atol=1e-4)


def test_pipelines_compiled_whole_frame_steps(sdxl_pipe) -> None:
    """The compile override (STADI_COMPILE): whole-frame steps run through torch.compile (one compiled denoiser
    per pipeline in the workspace) and give the eager result; the backend here is aot_eager (no C++ toolchain
    time in tests)."""
    from stadi_worker.engine.bands import Workspace
    from stadi_worker.engine.options import EngineOptions

    spec = DiffusionJobSpec.model_validate(job_spec("sdxl", steps=2))
    eager = generate_serial(sdxl_pipe, spec, "a lighthouse", 5, decode=False)
    torch._dynamo.reset()
    ws = Workspace(EngineOptions(compile="aot_eager"))
    compiled = generate_serial(sdxl_pipe, spec, "a lighthouse", 5, decode=False, workspace=ws)
    [module] = ws._compiled.values()
    assert type(module).__name__ == "OptimizedModule" and module._orig_mod is sdxl_pipe.unet
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 1  # dynamo really traced the denoiser
    assert torch.allclose(compiled.latents, eager.latents, atol=1e-5)
    assert Workspace().step_denoiser(type("Ops", (), {"denoiser": sdxl_pipe.unet})(), spec) is None


def test_compile_is_the_jobs_unless_the_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    from stadi_worker.settings import WorkerSettings

    monkeypatch.delenv("STADI_COMPILE", raising=False)
    compile_backend = WorkerSettings().engine.compile_backend
    assert (compile_backend(True), compile_backend(False)) == ("inductor", None)
    monkeypatch.setenv("STADI_COMPILE", "0")  # a debugging switch: never compile
    assert WorkerSettings().engine.compile_backend(True) is None
    monkeypatch.setenv("STADI_COMPILE", "aot_eager")
    assert WorkerSettings().engine.compile_backend(False) == "aot_eager"
    spec = DiffusionJobSpec.model_validate(job_spec("sdxl", steps=2))
    assert spec.model.compile is False
    assert DiffusionJobSpec.model_validate({**job_spec("sdxl"), "model": {**job_spec("sdxl")["model"],
                                                                           "compile": True}}).model.compile


def test_pipelines_runnable_families_are_the_worker_classes() -> None:
    """Every family the API admits (and the planner plans) is one the worker can load."""
    from stadi_worker.models import FAMILIES as WORKER_FAMILIES

    from stadi.families import FAMILIES

    assert set(WORKER_FAMILIES) == set(FAMILIES)


def test_each_family_is_one_module_behind_the_protocol(tiny_dir) -> None:
    """The registry lists each family's ModelOps once, from its own module, with a pipeline class diffusers has;
    a family without a stage split says so in the words the engine reports."""
    import importlib

    import diffusers
    from stadi_worker.models import FAMILIES, family_ops
    from stadi_worker.models.base import ModelOps

    for name, ops in FAMILIES.items():
        assert issubclass(ops, ModelOps) and ops.family == name
        assert ops.__module__ == f"stadi_worker.models.{name}"
        assert isinstance(getattr(diffusers, ops.pipeline_class), type)
        assert importlib.import_module(ops.__module__).__doc__
    with pytest.raises(ValueError, match="family 'kandinsky' is not supported by this worker; supported: sdxl"):
        family_ops("kandinsky")
    pixart = FAMILIES["pixart"](pipe=None)
    with pytest.raises(ValueError, match="strategy hybrid has no stage split for family 'pixart'"):
        pixart.units(16, 16)
