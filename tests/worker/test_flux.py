"""The Flux family (FLUX.1's guidance-distilled transformer, docs/architecture.md "Model families") on the tiny
random-weight pipeline: the serial loop against diffusers' FluxPipeline, bands on 2 and 3 Gloo ranks against the
serial run, strides, and what a Flux job may not ask for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import job_spec, launch_ranks, make_plan

PROMPT, SEED = "a red bicycle in the snow", 3
MAX_ABS = 1e-4  # fp32: synchronous bands reproduce the serial latent up to summation order


def flux_plan(bands: list[tuple[int, int]], **kw: Any) -> dict[str, Any]:
    return make_plan("flux", bands, guidance=False, **kw)


def _launch(world: int, runs: list[dict[str, Any]], cache: Path, workdir: Path) -> Any:
    cfg = {"spec": job_spec("flux", guidance=3.5), "prompt": PROMPT, "seed": SEED, "cache_dir": str(cache),
           "runs": [{"name": "serial", "plan": None}, *runs]}
    return launch_ranks(world, cfg, workdir).check()


def _text_below() -> dict[str, Any]:
    doc = flux_plan([(0, 10), (10, 16)]) | {"strategy": "stadi", "sync_period": 2}
    doc["ranks"][0]["stride"] = 2
    return doc


@pytest.fixture(scope="module")
def flux2(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tiny_dir("flux")
    strided = flux_plan([(0, 10), (10, 16)], warmup=2) | {"strategy": "stadi", "sync_period": 2}
    strided["ranks"][1]["stride"] = 2
    return _launch(2, [
        {"name": "sync_equal", "plan": flux_plan([(0, 8), (8, 16)]), "exact": True},
        {"name": "sync_unequal", "plan": flux_plan([(0, 2), (2, 16)]), "exact": True},
        # the text band below (the first of the smallest stride): rank 1 computes the text, rank 0 none
        {"name": "sync_text_below", "plan": _text_below(), "exact": True},
        {"name": "stale_unequal", "plan": flux_plan([(0, 6), (6, 16)], warmup=2)},
        {"name": "strided", "plan": strided},
    ], model_cache, tmp_path_factory.mktemp("flux2"))


@pytest.fixture(scope="module")
def flux3(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tiny_dir("flux")
    return _launch(3, [
        {"name": "sync_three", "plan": flux_plan([(0, 4), (4, 6), (6, 16)]), "exact": True},
    ], model_cache, tmp_path_factory.mktemp("flux3"))


def _err(launch: Any, name: str) -> float:
    return float((launch.result(name)["latents"] - launch.result("serial")["latents"]).abs().max())


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10((ref.max() - ref.min()).square() / (x - ref).square().mean()))


@pytest.mark.parametrize(("source", "size"), [("random://tiny", None), ("builtin://flux-small", 256)])
def test_the_serial_loop_equals_diffusers_flux_pipeline(tiny_dir, model_cache: Path, source: str,
                                                        size: int | None) -> None:
    """Our serial loop (packed bands of one, ids, guidance embedding, the resolution-dependent shift) and
    FluxPipeline on the same checkpoint, prompt and initial noise: the same final latent (the random tiny model
    and the trained one)."""
    from stadi_worker.engine.sampling import initial_noise, job_sampler
    from stadi_worker.engine.serial import generate_serial
    from stadi_worker.job.loading import load_pipeline
    from stadi_worker.models import ops_for
    from stadi_worker.models.flux import MAX_SEQUENCE_LENGTH, pack, unpack

    from stadi.api import DiffusionJobSpec

    torch.set_num_threads(1)
    tiny_dir("flux")
    doc = job_spec("flux", guidance=3.5)
    doc["model"]["source"] = source
    spec = DiffusionJobSpec.model_validate(doc | ({"height": size, "width": size} if size else {}))
    pipe = load_pipeline(spec.model, "cpu", model_cache)
    ops = ops_for(pipe, "flux")
    ours = generate_serial(pipe, spec, PROMPT, SEED).latents
    noise = initial_noise(ops.latent_shape(spec), SEED, job_sampler(ops, spec).init_noise_sigma)
    theirs = pipe(prompt=PROMPT, height=spec.height, width=spec.width, num_inference_steps=spec.steps,
                  guidance_scale=spec.guidance_scale, latents=pack(noise), output_type="latent",
                  max_sequence_length=MAX_SEQUENCE_LENGTH).images
    assert float((ours - unpack(theirs, *noise.shape[-2:])).abs().max()) <= 1e-5
    # the guidance scale is an input of the one branch: another scale is another image
    other = generate_serial(pipe, spec.model_copy(update={"guidance_scale": 1.5}), PROMPT, SEED).latents
    assert float((other - ours).abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["sync_equal", "sync_unequal", "sync_text_below"])
def test_synchronous_bands_equal_serial_on_two_ranks(flux2: Any, name: str) -> None:
    """Exact mode: the ranks that do not compute the text read its keys and values fresh, layer by layer."""
    assert _err(flux2, name) <= MAX_ABS


def test_only_the_text_band_computes_the_text() -> None:
    """The band wrappers of a rank that is not its group's text band feed the transformer no text tokens; the text
    band's rank keeps its projection."""
    from stadi_worker.engine.comm import BandLayout, CommManager
    from stadi_worker.engine.layers import DenoiserPatch, PatchFluxTextEmbed
    from stadi_worker.models.flux import transformer

    from stadi.api import Plan

    p = Plan.model_validate(_text_below())
    assert [p.computes_text(r) for r in (0, 1)] == [False, True]
    for index, swapped in ((0, True), (1, False)):
        model = transformer("tiny")
        original = model.context_embedder
        patch = DenoiserPatch(model, CommManager(BandLayout(((0, 10), (10, 16)), index, 16, text=1)))
        patch.apply()
        assert isinstance(model.context_embedder, PatchFluxTextEmbed) is swapped
        text = torch.randn(1, 7, 32)
        width = model.config.num_attention_heads * model.config.attention_head_dim
        assert model.context_embedder(text).shape == (1, 0 if swapped else 7, width)
        patch.restore()
        assert model.context_embedder is original


def test_synchronous_bands_equal_serial_on_three_ranks(flux3: Any) -> None:
    assert _err(flux3, "sync_three") <= MAX_ABS


def test_stale_context_and_strides_stay_close(flux2: Any) -> None:
    """Warmup 2 of 8 steps, then one-step-old context of the other band (and the second rank at stride 2): not
    exact, and close to serial (fidelity on a trained model is the bench's: the tiny model is random)."""
    ref = flux2.result("serial")["latents"]
    for name in ("stale_unequal", "strided"):
        assert _err(flux2, name) > MAX_ABS
        assert _psnr(flux2.result(name)["latents"], ref) >= 40.0, name
    assert flux2.result("strided")["evals"][1] == [0, 1, 2, 4, 6]


def test_a_flux_job_has_no_guidance_branches_to_split() -> None:
    """FLUX.1 is guidance-distilled: a strategy that splits the guidance branches is refused naming the field, and
    the planner never offers one (the job runs one branch whatever its guidance scale)."""
    from stadi.api import load_job
    from stadi.planner import Device, PlanRequest, plan

    for strategy in ("cfg", "cfg-stride", "stadi+cfg", "hybrid"):
        doc = {"apiVersion": "stadi.dev/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": "f"},
               "spec": job_spec("flux", guidance=3.5) | {"parallelism": {"strategy": strategy}}}
        with pytest.raises(ValueError, match=r"spec\.parallelism\.strategy: .* guidance-distilled"):
            load_job(doc)
    spec = load_job({"apiVersion": "stadi.dev/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": "f"},
                     "spec": job_spec("flux", guidance=3.5)}).spec
    assert not spec.uses_cfg
    p = plan(PlanRequest.from_spec(spec, 150.0), [Device("H100", 0.0, index=0), Device("H100", 0.5, index=1)])
    assert p.guidance is False and not {"cfg", "cfg-stride", "stadi+cfg", "hybrid"} & set(p.alternatives)


def test_a_size_off_the_packed_token_grid_is_refused_naming_the_field() -> None:
    """A band is whole rows of 2x2-packed tokens: 16 px. 1000 px is refused naming spec.height."""
    from stadi.api import load_job

    doc = {"apiVersion": "stadi.dev/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": "f"},
           "spec": job_spec("flux") | {"height": 1000}}
    with pytest.raises(ValueError, match=r"spec.height: height 1000 is not a multiple of 16"):
        load_job(doc)
