"""The text encoders and the denoiser of a small model, trained together on the VAE's latents.

The loop speaks to the model only through its family's ``ModelOps``: prompts become the denoiser's inputs by
``encode`` (with gradients into the text encoders; every caption once per step) and the denoiser runs by calling
the ops, exactly as the engine will at inference. A dropped caption trains the unconditional branch as the
pipeline builds it (SDXL: zeros; SD3: the empty prompt's encoding), so classifier-free guidance steers against
what was learned; a guidance-distilled family (Flux) drops none, and sees the job's guidance scale as its input.
The latents come from a bank of augmented images encoded once.

The target follows the family's training: epsilon of the DDPM noise schedule in the pipeline's scheduler config
for the UNet families (weighted by min-SNR, gamma 5), the flow-matching velocity (noise minus image, at a
logit-normal sigma) for the flow families.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from stadi_worker.models.base import ModelOps
from tqdm import tqdm

from stadi.api import DiffusionJobSpec
from stadi_bench.train.data import CAPTIONS, Batches
from stadi_bench.train.schedule import Deadline, Ema, autocast, descend, optimizer

log = logging.getLogger(__name__)
MIN_SNR_GAMMA = 5.0


def training_spec(family: str, size: int) -> DiffusionJobSpec:
    """The job whose conditioning the model is trained with (the size micro-conditions of SDXL come from it)."""
    return DiffusionJobSpec.model_validate({
        "model": {"family": family, "source": "random://tiny"}, "prompts": ["x"], "height": size, "width": size,
        "output": {"uri": "file:///tmp/stadi-train"}})


def _noised(ops: ModelOps, latents: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(noisy latents, timesteps, target, loss weight per item) of the family's training objective."""
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    batch = latents.shape[0]
    if ops.flow_matching:
        sigma = torch.sigmoid(torch.randn(batch, generator=gen)).to(latents.device)
        s = sigma.view(-1, 1, 1, 1)
        train_steps = ops.pipe.scheduler.config.num_train_timesteps
        return (1.0 - s) * latents + s * noise, sigma * train_steps, noise - latents, torch.ones_like(sigma)
    alphas = ops.pipe.scheduler.alphas_cumprod.to(latents.device)
    t = torch.randint(len(alphas), (batch,), generator=gen).to(latents.device)
    a = alphas[t].view(-1, 1, 1, 1)
    snr = alphas[t] / (1.0 - alphas[t])
    weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
    return a.sqrt() * latents + (1.0 - a).sqrt() * noise, t, noise, weight


@torch.no_grad()
def latent_bank(vae: Any, batches: Batches, size: int, chunk: int = 256) -> tuple[torch.Tensor, ...]:
    """``size`` augmented images encoded once: the posterior's mean and standard deviation of each, scaled (and
    shifted) as the pipeline scales latents, and its caption index. Training draws from the bank instead of
    augmenting and encoding every step."""
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    means, stds, captions = [], [], []
    for _ in range(size // chunk):
        images, caption = batches.draw(chunk)
        dist = vae.encode(images).latent_dist
        means.append(((dist.mean - shift) * scale).float())
        stds.append((dist.std * scale).float())
        captions.append(caption)
    return torch.cat(means), torch.cat(stds), torch.cat(captions).to(means[0].device)


def train_denoiser(ops: ModelOps, batches: Batches, steps: int, batch: int, lr: float, text_lr: float,
                   seed: int, bank: int = 8192, drop: float = 0.1, deadline: Deadline | None = None,
                   precision: str = "bf16") -> dict[str, float]:
    """Train the denoiser and the text encoders of ``ops.pipe`` in place, ``steps`` steps of ``batch`` latents
    drawn from a bank of ``bank`` augmented images, each caption dropped with probability ``drop`` (fewer steps
    if ``deadline`` passes first), under ``precision`` (``autocast``); returns the final loss, the steps run and
    the time."""
    pipe = ops.pipe
    device = ops.device
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    denoiser = ops.denoiser
    pipe.vae.eval().requires_grad_(False)
    means, stds, caption_of = latent_bank(pipe.vae, batches, bank)
    for module in (denoiser, *encoders):
        module.train().requires_grad_(True)
    params = [p for m in (denoiser, *encoders) for p in m.parameters()]
    opt, sched = optimizer([{"params": list(denoiser.parameters()), "lr": lr},
                            {"params": [p for m in encoders for p in m.parameters()], "lr": text_lr}], steps)
    ema = Ema(params, 0.999)
    spec = training_spec(ops.family, batches.size)
    gen = torch.Generator("cpu").manual_seed(seed)
    started, recent, done = time.perf_counter(), [], 0
    for step in tqdm(range(steps), desc=f"{ops.family} denoiser", unit="step", disable=None, dynamic_ncols=True):
        if deadline is not None and deadline.passed():
            log.warning(f"{ops.family}: deadline passed after {step} of {steps} steps")
            break
        picks = torch.randint(len(means), (batch,), generator=gen).to(device)
        latents = means[picks] + stds[picks] * torch.randn(batch, *means.shape[1:], generator=gen).to(device)
        # every caption once, plus the unconditional inputs at index len(CAPTIONS) for the dropped ones (a
        # guidance-distilled family has no unconditional branch: nothing is dropped)
        dropped = torch.rand(batch, generator=gen).to(device) < drop
        with autocast(device, precision):
            branches = ops.encode(spec, list(CAPTIONS), guidance=True)
            uncond = branches.get("uncond")
            if uncond is None:
                cond = {k: v[caption_of[picks]] for k, v in branches["cond"].items()}
            else:
                rows = torch.where(dropped, len(CAPTIONS), caption_of[picks])
                cond = {k: torch.cat([v, uncond[k][:1]])[rows] for k, v in branches["cond"].items()}
            noisy, t, target, weight = _noised(ops, latents, gen)
            pred = ops(noisy, t, cond).float()
        loss = (weight * (pred - target).square().mean(dim=(1, 2, 3))).mean()
        descend(loss, params, opt, sched, ema)
        recent, done = [*recent[-99:], float(loss.detach())], step + 1
        if step % 1000 == 0 or step == steps - 1:
            log.info(f"{ops.family} step {step}/{steps}: loss {sum(recent) / len(recent):.4f} "
                     f"({time.perf_counter() - started:.0f} s)")
    ema.copy_to()
    for module in (denoiser, *encoders):
        module.eval().requires_grad_(False)
    return {"denoiser_loss": round(sum(recent) / len(recent), 5), "steps_run": done,
            "denoiser_seconds": round(time.perf_counter() - started, 1)}


def sample_grid(ops: ModelOps, captions: list[str], size: int, steps: int = 30, seed: int = 0) -> Any:
    """One image per caption from the trained model through the engine's serial loop, as a PIL grid."""
    from PIL import Image
    from stadi_worker.engine.serial import generate_serial

    spec = training_spec(ops.family, size).model_copy(update={"steps": steps})
    tiles = [generate_serial(ops.pipe, spec, c, seed + i).image for i, c in enumerate(captions)]
    cols = 6
    grid = Image.new("RGB", (cols * size, ((len(tiles) + cols - 1) // cols) * size), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * size, (i // cols) * size))
    return grid
