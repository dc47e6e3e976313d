"""``stadi train``: one small trained model of a family, from scratch, written as a diffusers checkpoint.

The architecture is the family's ``small`` one (``ModelOps.build("small")``: the family's block types at reduced
width and depth, its own VAE and CLIP text towers, a byte-level tokenizer). Seeded: the same seed, steps and
batch give the same model on the same software (up to the GPU's non-deterministic reductions). Writes the
checkpoint in fp16 safetensors (loadable with ``from_pretrained``), a grid of samples, and ``train.json`` with
the settings, losses and times.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from stadi_bench.train.data import CAPTIONS, Batches, load_samples
from stadi_bench.train.denoiser import sample_grid, train_denoiser
from stadi_bench.train.schedule import Deadline
from stadi_bench.train.vae import scale_latents, train_vae

log = logging.getLogger(__name__)


def train(family: str, out: Path, *, size: int, device: str, seed: int, vae_steps: int, steps: int, batch: int,
          vae_batch: int, lr: float, text_lr: float, vae_lr: float, bank: int, max_seconds: float | None = None,
          samples_dir: Path | None = None, precision: str = "bf16") -> dict[str, Any]:
    """Train the small model of ``family`` and save it to ``out``; returns the record written to train.json.
    ``max_seconds`` is a safety stop: each phase ends early if the run would outlast it, and the steps run are
    recorded."""
    from stadi_worker.job.loading import save_pipeline
    from stadi_worker.models import family_ops

    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    dev = torch.device(device)
    ops = family_ops(family)(family_ops(family).build("small").to(dev))
    samples = load_samples()
    record: dict[str, Any] = {
        "family": family, "size": size, "seed": seed, "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda" else f"CPU ({platform.machine()})", "vae_steps": vae_steps, "steps": steps,
        "batch": batch, "vae_batch": vae_batch, "lr": lr, "text_lr": text_lr, "vae_lr": vae_lr, "bank": bank,
        "max_seconds": max_seconds, "precision": precision,
        "images": len(samples), "captions": list(CAPTIONS), "torch": torch.__version__,
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in ops.pipe.components.items()
                       if isinstance(m, torch.nn.Module)}}
    # the VAE may take a third of the time left for training; the rest is the denoiser's
    vae_deadline = Deadline(None if max_seconds is None else max_seconds / 3)
    deadline = Deadline(None if max_seconds is None else max_seconds - 40)  # samples and saving after it
    record |= train_vae(ops.pipe.vae, Batches.of(samples, size, dev, seed), vae_steps, vae_batch, vae_lr,
                        vae_deadline)
    scale_latents(ops.pipe.vae, Batches.of(samples, size, dev, seed + 1), shifted=ops.flow_matching)
    record["vae_scaling_factor"] = ops.pipe.vae.config.scaling_factor
    record["vae_shift_factor"] = ops.pipe.vae.config.shift_factor
    record |= train_denoiser(ops, Batches.of(samples, size, dev, seed + 2), steps, batch, lr, text_lr, seed + 3,
                             bank=bank, deadline=deadline, precision=precision)
    if samples_dir is not None:
        samples_dir.mkdir(parents=True, exist_ok=True)
        sample_grid(ops, list(CAPTIONS), size).save(samples_dir / f"samples-{family}.png")
    ops.pipe.to(torch.float16)
    save_pipeline(ops.pipe, out)
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["megabytes"] = round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6, 2)
    (out / "train.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def command(args: Any) -> int:
    """``stadi train``."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    record = train(args.family, Path(args.out), size=args.size, device=device, seed=args.seed,
                   vae_steps=args.vae_steps, steps=args.steps, batch=args.batch, vae_batch=args.vae_batch,
                   lr=args.lr, text_lr=args.text_lr, vae_lr=args.vae_lr, bank=args.bank,
                   max_seconds=args.max_seconds, samples_dir=Path(args.samples) if args.samples else None,
                   precision=args.precision)
    print(json.dumps({k: v for k, v in record.items() if k not in ("captions", "parameters")}, indent=1))
    return 0
