"""Load diffusers pipelines and speak to them per family: prompts, denoiser call, latent geometry, decoding.

The sampling loop never calls ``pipe.__call__``: it needs to run the denoiser on a band of rows and the
scheduler on that band, so it asks this module for the pieces (``FamilyOps``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stadi.api import DiffusionJobSpec, ModelSource
from stadi.families import profile

log = logging.getLogger(__name__)

# diffusers pipeline class per family (what from_pretrained must produce)
PIPELINE_CLASSES = {
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd15": "StableDiffusionPipeline",
    "pixart": "PixArtAlphaPipeline",
}
FLOW_FAMILIES = ("sd3",)
DIT_FAMILIES = ("sd3", "pixart")  # denoiser at pipe.transformer (the others: pipe.unet)
PIXART_TOKENS = 120  # PixArt-alpha's T5 prompt length (training and diffusers' default)
CACHE_VERSION = "v2"  # bump when tiny.py's configs change, so stale caches are not reused


def _dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    if device.type == "cpu" and dtype == torch.float16:
        # fp16 convolutions are missing or very slow on CPU; run the CPU path in fp32 and say so
        log.warning("float16 requested on CPU: running in float32")
        return torch.float32
    return dtype


def _random_dir(family: str, size: str, cache_dir: Path) -> Path:
    """Build (once) and return the on-disk random pipeline of ``family``/``size`` under ``cache_dir``."""
    from stadi_worker.tiny import save_random_pipeline

    final = cache_dir / f"random-{size}-{family}-{CACHE_VERSION}"
    if (final / "model_index.json").exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    # The ranks of one machine share the cache: one builds while the others wait on the lock. The copy is
    # built in a temp dir and renamed, so a reader never sees half a pipeline (even across machines sharing
    # a volume, where the lock may not hold: the builders are seeded, so any winner's copy is the same).
    with open(cache_dir / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "model_index.json").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
        try:
            save_random_pipeline(family, size, tmp)  # type: ignore[arg-type]
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "model_index.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_source(source: ModelSource, cache_dir: Path, endpoint: str | None = None) -> Path:
    """The local directory holding the pipeline of ``source`` (building or downloading it when needed)."""
    uri = source.source
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if uri.startswith("random://"):
        return _random_dir(source.family, uri.removeprefix("random://"), cache_dir)
    if uri.startswith("s3://"):
        from stadi_worker.storage import download_prefix  # object storage is someone else's module

        dest = cache_dir / "s3" / uri.removeprefix("s3://").strip("/").replace("/", "__")
        return download_prefix(uri, dest, endpoint)
    raise ValueError(f"model source {uri!r}: hub ids need network access; use s3://, file:// or random://")


def load_pipeline(source: ModelSource, device: str | torch.device, cache_dir: Path,
                  endpoint: str | None = None) -> Any:
    """Load the pipeline of ``source`` with ``from_pretrained`` from a local directory, on ``device``."""
    import diffusers

    device = torch.device(device)
    path = resolve_source(source, Path(cache_dir), endpoint)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"{path} holds no diffusers pipeline (model_index.json missing)")
    cls = getattr(diffusers, PIPELINE_CLASSES[source.family]) if source.family in PIPELINE_CLASSES else None
    if cls is None:
        raise ValueError(f"family {source.family!r} is not supported by this worker; "
                         f"supported: {', '.join(PIPELINE_CLASSES)}")
    extra: dict[str, Any] = {}
    if source.family == "sd3" and not (path / "text_encoder_3").exists():
        extra = {"text_encoder_3": None, "tokenizer_3": None}  # saved without T5 (see tiny.py)
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = cls.from_pretrained(path, dtype=_dtype(source.dtype, device), **extra)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_scheduler(pipe: Any, family: str, name: str) -> Any:
    """A fresh scheduler for ``name`` (ddim, euler, dpmpp-2m, flow-euler, default) built from the pipe's config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    config = pipe.scheduler.config
    if name == "default":
        name = profile(family).default_scheduler
        if name == "flow-euler" and family not in FLOW_FAMILIES:
            name = "euler"
    flow = family in FLOW_FAMILIES
    if flow != (name == "flow-euler"):
        raise ValueError(
            f"scheduler {name!r} does not fit family {family!r}: "
            + ("it is a flow-matching model, use flow-euler" if flow else "flow-euler is for flow-matching models")
        )
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp-2m": DPMSolverMultistepScheduler,
           "flow-euler": FlowMatchEulerDiscreteScheduler}[name]
    if isinstance(pipe.scheduler, cls):
        return cls.from_config(config)
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpmpp-2m" else {}
    return cls.from_config(config, **extra)


@dataclass
class FamilyOps:
    """What the loop needs from one family's pipeline."""

    pipe: Any
    family: str

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer if self.family in DIT_FAMILIES else self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def latent_shape(self, spec: DiffusionJobSpec) -> tuple[int, int, int]:
        """(channels, latent rows, latent columns) of one image of ``spec``."""
        factor = self.pipe.vae_scale_factor
        return self.denoiser.config.in_channels, spec.height // factor, spec.width // factor

    def encode(self, spec: DiffusionJobSpec, prompt: str, guidance: bool) -> dict[str, dict[str, torch.Tensor]]:
        """Per branch ("cond", and "uncond" when guidance) the denoiser's keyword inputs, batch 1."""
        neg = spec.negative_prompt or None
        dev = self.device
        out: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            if self.family == "sdxl":
                pe, npe, ppe, nppe = self.pipe.encode_prompt(
                    prompt, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
                    negative_prompt=neg)
                # original size, crop top-left, target size: the pipeline's defaults for an uncropped image
                time_ids = torch.tensor([[spec.height, spec.width, 0, 0, spec.height, spec.width]],
                                        device=dev, dtype=pe.dtype)
                out["cond"] = {"encoder_hidden_states": pe, "text_embeds": ppe, "time_ids": time_ids}
                if guidance:
                    out["uncond"] = {"encoder_hidden_states": npe, "text_embeds": nppe, "time_ids": time_ids}
            elif self.family == "sd15":
                pe, npe = self.pipe.encode_prompt(prompt, dev, 1, guidance, negative_prompt=neg)
                out["cond"] = {"encoder_hidden_states": pe}
                if guidance:
                    out["uncond"] = {"encoder_hidden_states": npe}
            elif self.family == "sd3":
                pe, npe, ppe, nppe = self.pipe.encode_prompt(
                    prompt=prompt, prompt_2=None, prompt_3=None, device=dev, do_classifier_free_guidance=guidance,
                    negative_prompt=neg)
                out["cond"] = {"encoder_hidden_states": pe, "pooled_projections": ppe}
                if guidance:
                    out["uncond"] = {"encoder_hidden_states": npe, "pooled_projections": nppe}
            elif self.family == "pixart":
                out = self._encode_pixart(spec, prompt, guidance)
            else:
                raise ValueError(f"family {self.family!r} is not supported")
        return out

    def _encode_pixart(self, spec: DiffusionJobSpec, prompt: str, guidance: bool) -> dict[str, dict[str, torch.Tensor]]:
        """T5 states with their padding masks (the cross-attention must not attend to pad tokens); the
        1024 model (``use_additional_conditions``) also takes the image size and aspect ratio."""
        dev = self.device
        pe, pm, npe, npm = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=guidance, negative_prompt=spec.negative_prompt or "", device=dev,
            clean_caption=False, max_sequence_length=PIXART_TOKENS)
        micro: dict[str, torch.Tensor] = {}
        if self.denoiser.use_additional_conditions:
            micro = {"resolution": torch.tensor([[spec.height, spec.width]], device=dev, dtype=pe.dtype),
                     "aspect_ratio": torch.tensor([[spec.height / spec.width]], device=dev, dtype=pe.dtype)}
        out = {"cond": {"encoder_hidden_states": pe, "encoder_attention_mask": pm, **micro}}
        if guidance:
            out["uncond"] = {"encoder_hidden_states": npe, "encoder_attention_mask": npm, **micro}
        return out

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 denoiser: Any = None) -> torch.Tensor:
        """One denoiser evaluation on ``latents`` (a band or the full frame) with batched conditioning;
        ``denoiser`` replaces the pipeline's own (a compiled version of it)."""
        batch = latents.shape[0]
        net = denoiser if denoiser is not None else self.denoiser
        if self.family in FLOW_FAMILIES:
            return net(
                hidden_states=latents, timestep=t.expand(batch), encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"], return_dict=False)[0]
        if self.family == "pixart":
            micro = {"resolution": cond.get("resolution"), "aspect_ratio": cond.get("aspect_ratio")}
            out = net(latents, encoder_hidden_states=cond["encoder_hidden_states"],
                      encoder_attention_mask=cond["encoder_attention_mask"], timestep=t.expand(batch),
                      added_cond_kwargs=micro, return_dict=False)[0]
            # learned sigma: the variance channels follow the noise prediction; the sampler uses the noise only
            return out[:, :self.denoiser.config.in_channels]
        added = None
        if self.family == "sdxl":
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return net(latents, t, encoder_hidden_states=cond["encoder_hidden_states"],
                   added_cond_kwargs=added, return_dict=False)[0]

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        with torch.no_grad():
            x = latents.to(vae.dtype) / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None) is not None:
                x = x + vae.config.shift_factor
            return vae.decode(x, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> Any:
        """Full latent (batch 1) -> PIL image."""
        return self.pipe.image_processor.postprocess(self._vae_decode(latents), output_type="pil")[0]

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Full latent (batch 1) -> float image (1, 3, H, W) in [0, 1] (fidelity metrics, no 8-bit rounding)."""
        return (self._vae_decode(latents).float() / 2 + 0.5).clamp(0, 1).cpu()


def batch_branches(branches: dict[str, dict[str, torch.Tensor]], order: list[str]) -> dict[str, torch.Tensor]:
    """Concatenate the per-branch inputs of ``order`` along the batch (diffusers order: uncond, cond)."""
    keys = branches[order[0]].keys()
    return {k: torch.cat([branches[b][k] for b in order]) for k in keys}
