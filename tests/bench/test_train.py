"""``stadi train`` on the CPU: the training images and their augmentation, and a few steps of each family that
end in a checkpoint the worker loads as a real one; the fidelity harness's seam score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from stadi_bench.train.data import CAPTIONS, SAMPLES, Batches, load_samples


@pytest.fixture(scope="module")
def samples() -> list:
    return load_samples()


def test_every_training_image_ships_in_a_package(samples: list) -> None:
    assert len(samples) == len(SAMPLES) >= 20
    for (image, caption, _), (_, name, _, _) in zip(samples, SAMPLES, strict=True):
        assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 100 and caption in CAPTIONS


def test_batches_are_augmented_seeded_crops(samples: list) -> None:
    one = Batches.of(samples, 64, torch.device("cpu"), seed=7)
    images, captions = one.draw(12)
    assert images.shape == (12, 3, 64, 64) and images.min() >= -1.0 and images.max() <= 1.0
    assert captions.shape == (12,) and int(captions.min()) >= 0 and int(captions.max()) < len(CAPTIONS)
    again, same = Batches.of(samples, 64, torch.device("cpu"), seed=7).draw(12)
    assert torch.equal(again, images) and torch.equal(same, captions)  # seeded
    other, _ = Batches.of(samples, 64, torch.device("cpu"), seed=8).draw(12)
    assert not torch.equal(other, images)
    # a crop of a sample, not a blend or an empty corner of the canvas: every crop has structure
    assert float(images.std(dim=(1, 2, 3)).min()) > 0.01


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_a_few_steps_make_a_checkpoint_the_worker_loads(family: str, tmp_path: Path) -> None:
    from stadi_bench.train.run import train
    from stadi_worker.engine.serial import generate_serial
    from stadi_worker.job.loading import load_pipeline

    from stadi.api import DiffusionJobSpec, ModelSource

    torch.set_num_threads(2)
    out = tmp_path / family
    record = train(family, out, size=64, device="cpu", seed=0, vae_steps=2, steps=2, batch=4, vae_batch=2,
                   lr=1e-3, text_lr=3e-4, vae_lr=1e-3, bank=256, precision="fp32")
    saved = json.loads((out / "train.json").read_text())
    assert saved["precision"] == "fp32"  # the denoiser's arithmetic is recorded (bf16 autocast on a GPU by default)
    assert saved == json.loads(json.dumps(record)) and saved["steps_run"] == 2 and saved["vae_steps_run"] == 2
    assert saved["captions"] == list(CAPTIONS) and saved["megabytes"] < 16
    assert (saved["vae_shift_factor"] is not None) == (family in ("sd3", "flux"))  # their VAEs shift latents
    weights = [p for p in out.rglob("*.safetensors")]
    assert len(weights) == 4
    source = ModelSource(family=family, source=f"file://{out}", dtype="float32")
    pipe = load_pipeline(source, "cpu", tmp_path / "cache")
    assert pipe.vae.config.scaling_factor == saved["vae_scaling_factor"]
    spec = DiffusionJobSpec.model_validate({"model": source.dump(), "prompts": ["a cat"], "height": 64,
                                            "width": 64, "steps": 2, "output": {"uri": "file:///tmp/x"}})
    result = generate_serial(pipe, spec, "a cat", 0)
    assert result.image is not None and result.image.size == (64, 64)


def test_seam_score_sees_a_step_at_a_band_edge() -> None:
    from stadi_bench.fidelity import band_edges, seam_score

    plan = {"ranks": [{"rows": [0, 16]}, {"rows": [16, 32]}]}
    assert band_edges(plan, 8) == [128] and band_edges({"ranks": [{"rows": [0, 32]}] * 2}, 8) == []
    smooth = torch.linspace(0, 1, 256).view(1, 1, 256, 1).expand(1, 3, 256, 256).clone()
    assert seam_score(smooth, smooth, [128]) == pytest.approx(1.0)
    seamed = smooth.clone()
    seamed[..., 128:, :] += 0.05
    assert seam_score(seamed, smooth, [128]) > 10
    assert seam_score(seamed, smooth, []) is None
