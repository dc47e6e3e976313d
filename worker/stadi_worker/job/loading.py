"""A job's model on this node: its weights resolved to a local directory, loaded with diffusers
``from_pretrained`` exactly as a real checkpoint.

``file://`` is used in place (a mounted volume), ``builtin://NAME`` is a trained checkpoint shipped inside this
package (``models/builtin/NAME``), ``s3://`` is copied into the cache once, and ``random://tiny``
or ``random://full`` is a random-weight pipeline of the family's real architecture (``ModelOps.build``), saved
into the cache once per node so that every rank loads the same weights from disk.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from stadi.api import ModelSource
from stadi_worker.job.storage import download_prefix
from stadi_worker.models import family_ops
from stadi_worker.models.base import Size
from stadi_worker.models.components import write_clip_tokenizer

log = logging.getLogger(__name__)

CACHE_VERSION = "v3"  # bump when a family's random builder changes, so stale caches are not reused
DEFAULT_CACHE = Path.home() / ".cache" / "stadi"  # a node's cache when nothing else is said (STADI_CACHE)


def models_dir(cache: Path) -> Path:
    """Where a node cache keeps model weights: copies from object storage and random pipelines."""
    return cache / "models"


def _dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    if device.type == "cpu" and dtype == torch.float16:
        # fp16 convolutions are missing or very slow on CPU; run the CPU path in fp32 and say so
        log.warning("float16 requested on CPU: running in float32")
        return torch.float32
    return dtype


def save_random_pipeline(family: str, size: Size, dest: Path) -> Path:
    """Build a random-weight pipeline of ``family`` and save it to ``dest``: ``full`` in float16 (it is for speed
    only; FLUX.1-dev's 17 B parameters take 34 GB so, not 68), smaller sizes in float32 (their dtype in training)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if size == "full" else torch.float32)
    try:
        pipe = family_ops(family).build(size)
    finally:
        torch.set_default_dtype(previous)
    return save_pipeline(pipe, dest)


def save_pipeline(pipe: Any, dest: Path) -> Path:
    """``save_pretrained`` ``pipe`` to ``dest`` (safetensors), so that ``from_pretrained`` loads it back whole."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe.save_pretrained(dest, safe_serialization=True)
    # transformers 5 writes a model (config and weights) only on rank 0 of an initialised process group; a
    # worker rank building its own node's copy must still get the text encoders on disk.
    from safetensors.torch import save_model

    for name, component in pipe.components.items():
        if isinstance(component, transformers.PreTrainedModel):
            (dest / name).mkdir(parents=True, exist_ok=True)
            if not (dest / name / "config.json").exists():
                component.config.to_json_file(str(dest / name / "config.json"))
            if not (dest / name / "model.safetensors").exists():
                save_model(component, str(dest / name / "model.safetensors"), metadata={"format": "pt"})
    # transformers 5 saves only tokenizer.json; keep the hand-written vocab.json + merges.txt beside it
    for name, component in pipe.components.items():
        if isinstance(component, transformers.CLIPTokenizer):
            write_clip_tokenizer(dest / name)
    return dest


def random_dir(family: str, size: Size, cache_dir: Path) -> Path:
    """Build (once) and return the on-disk random pipeline of ``family``/``size`` under ``cache_dir``."""
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
            save_random_pipeline(family, size, tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "model_index.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def builtin_dir(name: str) -> Path:
    """The directory of the trained checkpoint ``builtin://name``, shipped inside the worker package."""
    path = Path(str(resources.files("stadi_worker.models") / "builtin" / name))
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"built-in model builtin://{name} is not in this worker (no {path})")
    return path


def resolve_source(source: ModelSource, cache_dir: Path, endpoint: str | None = None,
                   credentials_dir: Path | None = None) -> Path:
    """The local directory holding the pipeline of ``source`` (building or downloading it when needed)."""
    uri = source.source
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if uri.startswith("builtin://"):
        return builtin_dir(uri.removeprefix("builtin://"))
    if uri.startswith("random://"):
        return random_dir(source.family, uri.removeprefix("random://"), cache_dir)  # type: ignore[arg-type]
    if uri.startswith("s3://"):
        dest = cache_dir / "s3" / uri.removeprefix("s3://").strip("/").replace("/", "__")
        return download_prefix(uri, dest, endpoint, credentials_dir)
    raise ValueError(f"model source {uri!r}: hub ids need network access; use s3://, file:// or random://")


def load_pipeline(source: ModelSource, device: str | torch.device, cache_dir: Path, endpoint: str | None = None,
                  credentials_dir: Path | None = None) -> Any:
    """Load the pipeline of ``source`` with ``from_pretrained`` from a local directory, on ``device``."""
    import diffusers
    import transformers

    device = torch.device(device)
    ops = family_ops(source.family)
    path = resolve_source(source, Path(cache_dir), endpoint, credentials_dir)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"{path} holds no diffusers pipeline (model_index.json missing)")
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    cls = getattr(diffusers, ops.pipeline_class)
    pipe = cls.from_pretrained(path, dtype=_dtype(source.dtype, device), **ops.load_kwargs(path))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
