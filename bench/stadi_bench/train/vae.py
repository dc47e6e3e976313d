"""The VAE of a small model: trained to reconstruct the augmented images (L1 and MSE, the L1 of the image
gradients for sharper edges, a small KL term), then scaled so that its latents have unit variance."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from stadi_bench.train.data import Batches
from stadi_bench.train.schedule import Deadline, Ema, autocast, descend, optimizer

log = logging.getLogger(__name__)
KL_WEIGHT = 1e-6


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def train_vae(vae: Any, batches: Batches, steps: int, batch: int, lr: float,
              deadline: Deadline | None = None) -> dict[str, float]:
    """Train ``vae`` in place for ``steps`` steps of ``batch`` images (fewer if ``deadline`` passes first);
    returns the final losses and the steps run."""
    device = next(vae.parameters()).device
    vae.train()
    opt, sched = optimizer([{"params": list(vae.parameters()), "lr": lr}], steps)
    ema = Ema(vae.parameters(), 0.995)
    started, recent, done = time.perf_counter(), [], 0
    for step in tqdm(range(steps), desc="vae", unit="step", disable=None, dynamic_ncols=True):
        if deadline is not None and deadline.passed():
            log.warning(f"vae: deadline passed after {step} of {steps} steps")
            break
        x, _ = batches.draw(batch)
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample.float()
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        edges = sum((a - b).abs().mean() for a, b in zip(_edges(rec), _edges(x), strict=True))
        kl = posterior.kl().mean()
        loss = l1 + mse + edges + KL_WEIGHT * kl
        descend(loss, vae.parameters(), opt, sched, ema)
        recent, done = [*recent[-49:], float(l1.detach())], step + 1
        if step % 500 == 0 or step == steps - 1:
            log.info(f"vae step {step}/{steps}: l1 {sum(recent) / len(recent):.4f} "
                        f"({time.perf_counter() - started:.0f} s)")
    ema.copy_to()
    vae.eval()
    return {"vae_l1": round(sum(recent) / len(recent), 5), "vae_steps_run": done,
            "vae_seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def scale_latents(vae: Any, batches: Batches, shifted: bool, samples: int = 256, batch: int = 32) -> None:
    """Set the VAE's ``scaling_factor`` (and ``shift_factor`` where the family shifts, as SD3 does) so that
    scaled latents of the training images have mean 0 and standard deviation 1."""
    zs = []
    for _ in range(max(1, samples // batch)):
        x, _ = batches.draw(batch)
        zs.append(vae.encode(x).latent_dist.sample().float())
    z = torch.cat(zs)
    shift = float(z.mean()) if shifted else None
    std = float((z - (shift or 0.0)).std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 6), shift_factor=None if shift is None else round(shift, 6))
