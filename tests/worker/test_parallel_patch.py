"""Patch parallelism on 2-4 Gloo ranks against the serial run of the same tiny model and seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import job_spec, launch_ranks, make_plan

PROMPT = "a red bicycle in the snow"
SEED = 3
MAX_ABS = 1e-4  # fp32: synchronous bands must reproduce the serial latent up to summation order


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of latent ``x`` against ``ref``, peak = the reference's value range."""
    mse = (x - ref).square().mean()
    return float(10 * torch.log10((ref.max() - ref.min()).square() / mse))


def _launch(family: str, world: int, runs: list[dict[str, Any]], cache: Path, workdir: Path) -> Any:
    cfg = {"spec": job_spec(family), "prompt": PROMPT, "seed": SEED, "cache_dir": str(cache),
           "runs": [{"name": "serial", "plan": None}, *runs]}
    return launch_ranks(world, cfg, workdir).check()


@pytest.fixture(scope="module")
def sdxl2(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    tiny_dir("sdxl")
    f = "sdxl"
    return _launch(f, 2, [
        {"name": "sync_equal", "plan": make_plan(f, [(0, 8), (8, 16)]), "exact": True},
        {"name": "sync_unequal", "plan": make_plan(f, [(0, 4), (4, 16)]), "exact": True},
        {"name": "stale_unequal", "plan": make_plan(f, [(0, 4), (4, 16)], warmup=2)},
        {"name": "cfg_split", "plan": make_plan(f, [(0, 16), (0, 16)], ["cond", "uncond"], strategy="cfg"),
         "exact": True},
    ], model_cache, tmp_path_factory.mktemp("sdxl2"))


@pytest.fixture(scope="module")
def sd3_2(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    tiny_dir("sd3")
    f = "sd3"
    return _launch(f, 2, [
        {"name": "sync_equal", "plan": make_plan(f, [(0, 8), (8, 16)]), "exact": True},
        {"name": "sync_unequal", "plan": make_plan(f, [(0, 2), (2, 16)]), "exact": True},
        {"name": "stale_unequal", "plan": make_plan(f, [(0, 6), (6, 16)], warmup=2)},
    ], model_cache, tmp_path_factory.mktemp("sd3_2"))


@pytest.fixture(scope="module")
def pixart2(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    tiny_dir("pixart")
    f = "pixart"  # DiT of patch 2 with T5 cross-attention (masked), DPM-Solver++, learned sigma cut off
    return _launch(f, 2, [
        {"name": "sync_equal", "plan": make_plan(f, [(0, 8), (8, 16)]), "exact": True},
        {"name": "sync_unequal", "plan": make_plan(f, [(0, 2), (2, 16)]), "exact": True},
        {"name": "stale_unequal", "plan": make_plan(f, [(0, 6), (6, 16)], warmup=2)},
    ], model_cache, tmp_path_factory.mktemp("pixart2"))


@pytest.fixture(scope="module")
def sd15_2(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    tiny_dir("sd15")
    f = "sd15"  # 3 downsamplings: bands of 8 latent rows, DDIM
    return _launch(f, 2, [
        {"name": "sync_equal", "plan": make_plan(f, [(0, 8), (8, 16)]), "exact": True},
    ], model_cache, tmp_path_factory.mktemp("sd15_2"))


@pytest.fixture(scope="module")
def sdxl4(tiny_dir, model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    tiny_dir("sdxl")
    f = "sdxl"
    return _launch(f, 4, [
        # middle bands have neighbours on both sides; at the deepest level each band is one row
        {"name": "sync_four", "plan": make_plan(f, [(0, 4), (4, 8), (8, 12), (12, 16)]), "exact": True},
        # two groups of unequal, differently cut bands exchanging predictions every step
        {"name": "cfg_split_2x2", "plan": make_plan(f, [(0, 4), (4, 16), (0, 12), (12, 16)],
                                                    ["cond", "cond", "uncond", "uncond"], strategy="stadi+cfg"),
         "exact": True},
    ], model_cache, tmp_path_factory.mktemp("sdxl4"))


def test_band_embed_pixart_off_native_grid() -> None:
    """PixArt's PatchEmbed (sample_size 128: base size 64, interpolation scale 2) at a latent size other than
    its own: each band's tokens are the full image's rows of tokens (the full grid's sincos embedding, cut)."""
    from diffusers import PixArtTransformer2DModel
    from stadi_worker.engine.comm import BandLayout
    from stadi_worker.engine.layers import PatchBandEmbed

    embed = PixArtTransformer2DModel(sample_size=128, num_layers=1, num_attention_heads=2, attention_head_dim=12,
                                     cross_attention_dim=24, caption_channels=8).pos_embed
    x = torch.randn(2, 4, 24, 40)
    full = embed(x).view(2, 12, 20, -1)
    bands = ((0, 6), (6, 24))
    for i, (a, b) in enumerate(bands):
        band = PatchBandEmbed(embed, BandLayout(bands=bands, index=i, height=24))(x[..., a:b, :])
        assert torch.equal(band, full[:, a // 2:b // 2].reshape(2, -1, 24))


def _err(launch, name: str) -> float:
    ref = launch.result("serial")["latents"]
    x = launch.result(name)["latents"]
    assert x.shape == ref.shape
    return float((x - ref).abs().max())


# the 2-rank launch of each family with equal and unequal synchronous bands (and a stale run)
LAUNCH_2 = {"sdxl": "sdxl2", "sd3": "sd3_2", "pixart": "pixart2"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["sync_equal", "sync_unequal"])
@pytest.mark.parametrize("family", sorted(LAUNCH_2))
def test_parallel_sync_matches_serial(family: str, name: str, request: pytest.FixtureRequest) -> None:
    err = _err(request.getfixturevalue(LAUNCH_2[family]), name)
    print(f"{family} {name}: max abs latent error {err:.2e}")
    assert err <= MAX_ABS


@pytest.mark.timeout(300)
def test_parallel_sd15_sync_matches_serial(sd15_2) -> None:
    err = _err(sd15_2, "sync_equal")
    print(f"sd15 sync_equal: max abs latent error {err:.2e}")
    assert err <= MAX_ABS


# Stale mode (warmup 2 of 8 steps, then one-step-old activations of the other band) cannot be exact.
# Thresholds sit between what it scores and what an uncoupled split scores on the same model and seed:
# denoising each band as a separate image measured 31 dB (SDXL) and 46 dB (SD3; the random tiny MMDiT
# couples tokens weakly); stale mode measured ~52 dB and ~87 dB. PixArt (its latents reach +-600: the random
# model's x0 estimate at DDPM's alpha_T): bands whose self-attention saw only their own tokens measured
# 60 dB, stale mode 104 dB. A stale path that dropped the exchange (or read the wrong band) falls to the
# uncoupled level and fails.
STALE_MIN_PSNR = {"sdxl": 40.0, "sd3": 60.0, "pixart": 80.0}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", sorted(LAUNCH_2))
def test_parallel_stale_close_to_serial(family: str, request: pytest.FixtureRequest) -> None:
    launch = request.getfixturevalue(LAUNCH_2[family])
    ref = launch.result("serial")["latents"]
    x = launch.result("stale_unequal")["latents"]
    value = psnr(x, ref)
    print(f"{family} stale (warmup 2/8, unequal bands): PSNR {value:.1f} dB vs serial, "
          f"max abs {float((x - ref).abs().max()):.2e}")
    assert value >= STALE_MIN_PSNR[family]
    assert _err(launch, "stale_unequal") > 0  # stale really used old activations


@pytest.mark.timeout(300)
def test_parallel_condition_split_matches_unified(sdxl2) -> None:
    err_serial = _err(sdxl2, "cfg_split")
    unified = sdxl2.result("sync_equal")["latents"]
    split = sdxl2.result("cfg_split")["latents"]
    err_unified = float((split - unified).abs().max())
    print(f"cfg split (2 ranks): max abs vs serial {err_serial:.2e}, vs unified patch {err_unified:.2e}")
    assert err_serial <= MAX_ABS
    assert err_unified <= MAX_ABS


@pytest.mark.timeout(300)
def test_parallel_four_ranks(sdxl4) -> None:
    for name in ("sync_four", "cfg_split_2x2"):
        err = _err(sdxl4, name)
        print(f"sdxl 4 ranks {name}: max abs latent error {err:.2e}")
        assert err <= MAX_ABS


@pytest.mark.timeout(300)
def test_parallel_step_times_reported(sdxl2) -> None:
    times = sdxl2.result("sync_unequal")["step_ms"]
    assert len(times) == 2
    assert all(len(t) == 8 and all(ms > 0 for ms in t) for t in times)
