"""Compiled banded steps: a band's step inside the engine (its wrappers, exchange buffers and graph breaks at
every exchange) compiled with torch.compile gives the eager step's prediction, in every phase; and the one-GPU
benchmark of band steps runs (here on the CPU, with the aot_eager backend: no C++ toolchain time in tests)."""

from __future__ import annotations

import pytest
import torch

from stadi.api import DiffusionJobSpec


def _spec(family: str) -> DiffusionJobSpec:
    return DiffusionJobSpec.model_validate({
        "model": {"family": family, "source": "random://tiny", "dtype": "float32"},
        "prompts": ["a red bicycle in the snow"], "height": 128, "width": 128, "steps": 8, "guidanceScale": 5.0,
        "output": {"uri": "file:///tmp/stadi-test-out"}})


@pytest.mark.parametrize(("family", "rows", "batch", "text"), [
    ("sdxl", (12, 8), 2, True), ("sd3", (6, 10), 2, True), ("flux", (6, 10), 1, True), ("flux", (6, 10), 1, False)])
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_compiled_band_steps_equal_eager_ones(family: str, rows: tuple[int, ...], batch: int, text: bool, tiny_dir,
                                              model_cache) -> None:
    """The compiled share (dynamic shapes) predicts what the eager share does in a synchronous step, a window start
    and a local step; dynamo really traced the band step, and a second band height (a re-plan's) compiled
    nothing new. No frame falls back to eager for lack of recompiles (SDXL's wrapped GroupNorms did). Flux's
    band without the text (another band computes it) compiles with its empty text stream too."""
    from stadi_bench.band_steps import band_share
    from stadi_bench.steps import band_plan
    from stadi_worker.engine.bands import Workspace
    from stadi_worker.engine.options import EngineOptions
    from stadi_worker.job.loading import load_pipeline
    from stadi_worker.models import ops_for

    tiny_dir(family)
    spec = _spec(family)
    ops = ops_for(load_pipeline(spec.model, "cpu", model_cache), family)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    traced = []
    for height in rows:
        plan = band_plan(family, 16, height, guidance=batch == 2, text=text)
        assert plan.computes_text(0) is (text or family != "flux")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, options in (("eager", EngineOptions(compile="0")), ("compiled", EngineOptions(compile="aot_eager"))):
            ws = Workspace(options)
            with band_share(ops, spec, plan, ws, batch=batch) as step:
                out[name] = {phase: step(phase) for phase in ("sync", "exchange", "local")}
            if name == "compiled":
                [module] = ws._compiled.values()
                assert module.compiled._orig_mod is ops.denoiser
        traced.append(counters["stats"]["unique_graphs"])
        for phase, eager in out["eager"].items():
            assert eager.shape[-2] == height
            assert torch.allclose(out["compiled"][phase], eager, atol=1e-5), (family, height, phase)
    assert traced[0] >= 2  # traced, in pieces between the exchanges
    assert traced == traced[:1] * len(traced)  # one compile serves every band height


def test_band_step_times_per_phase(tiny_dir, model_cache) -> None:
    from stadi_bench.band_steps import band_step_ms
    from stadi_bench.steps import band_plan
    from stadi_worker.engine.bands import Workspace
    from stadi_worker.job.loading import load_pipeline
    from stadi_worker.models import ops_for

    tiny_dir("sd3")
    spec = _spec("sd3")
    ops = ops_for(load_pipeline(spec.model, "cpu", model_cache), "sd3")
    for batch in (2, 1):
        ms = band_step_ms(ops, spec, band_plan("sd3", 16, 6), Workspace(), batch, repeats=2)
        assert set(ms) == {"local", "exchange"} and all(v > 0 for v in ms.values())
