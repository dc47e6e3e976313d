"""One rank's share of a DiffusionJob: load the model, generate every prompt, write images and the manifest.

Every rank runs :func:`run_job` with the same spec and plan; the denoiser steps are collective, so all ranks
must walk the same list of prompts. Rank 0 decides that list once (prompts whose image is already in the
output are skipped, so a restarted job does not regenerate them) and broadcasts it. Rank 0 alone touches the
output: it encodes and writes each image as soon as it is done, so a later failure keeps what was written,
and writes ``manifest.json`` last.
"""

from __future__ import annotations

import io
import logging
import platform
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from stadi.api import DiffusionJobSpec, Plan
from stadi.policy import LimitError, Limits, check_prompts_size, prompt_problems
from stadi_worker.engine.options import EngineOptions
from stadi_worker.engine.sampling import Pace
from stadi_worker.job.loading import DEFAULT_CACHE, models_dir
from stadi_worker.job.manifest import (
    MANIFEST_NAME,
    ImageRecord,
    Manifest,
    PlanRecord,
    RankRecord,
    Timings,
    Versions,
    now,
)
from stadi_worker.job.progress import Progress, ProgressEvent
from stadi_worker.job.storage import Store, open_store

log = logging.getLogger(__name__)

def image_name(index: int, fmt: str) -> str:
    """Object name of prompt ``index``'s image."""
    return f"image-{index:04d}.{fmt}"


def encode_image(image: Any, fmt: str) -> bytes:
    """Encode a PIL image as png, jpeg or webp."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=95)
    else:
        raise ValueError(f"unsupported image format {fmt!r}; allowed: png, jpeg, webp")
    return buf.getvalue()


def load_prompts(spec: DiffusionJobSpec, credentials_dir: Path | None = None,
                 limits: Limits | None = None) -> list[str]:
    """The job's prompts: ``spec.prompts``, or one per non-blank line of the ``promptsFrom`` object, within the
    cluster's ``limits`` (LimitError naming the field otherwise): an object over the byte limit is refused from
    its size, never read."""
    limits = limits or Limits()
    if spec.prompts is not None:
        prompts, field = list(spec.prompts), "spec.prompts"
    else:
        assert spec.prompts_from is not None  # the API guarantees exactly one of the two
        uri, field = spec.prompts_from, "spec.promptsFrom"
        parent, _, name = uri.rpartition("/")
        # promptsFrom lives on the same S3 service as the output (one endpoint and secret per job).
        store = open_store(parent, spec.output.endpoint, credentials_dir, check=False)
        data, size = store.get_at_most(name, limits.max_prompts_from_bytes)
        check_prompts_size(size, uri, limits)
        try:
            text = data.decode()
        except UnicodeDecodeError as error:
            raise ValueError(f"spec.promptsFrom: {uri} is not UTF-8 text (byte {error.start})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"promptsFrom {uri} holds no prompts")
    if problems := prompt_problems(prompts, limits, field, spec.negative_prompt):
        raise LimitError("; ".join(problems))
    return prompts


def device_name(device: Any) -> str:
    """A human name for the device a rank runs on (the GPU's name, or the CPU)."""
    text = str(device)
    if text.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(text))
    return f"CPU ({platform.processor() or platform.machine()})"


# --- collectives (no-ops on a single rank) --------------------------------------------------------------


def _dist_ready(ctx: Any) -> bool:
    if getattr(ctx, "world_size", 1) <= 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _broadcast(obj: Any, ctx: Any) -> Any:
    """rank 0's ``obj`` on every rank."""
    if not _dist_ready(ctx):
        return obj
    import torch.distributed as dist

    box = [obj if ctx.rank == 0 else None]
    device = ctx.device if getattr(ctx, "backend", "gloo") == "nccl" else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def _gather(obj: Any, ctx: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    if not _dist_ready(ctx):
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# --- the job --------------------------------------------------------------------------------------------


def run_job(
    spec: DiffusionJobSpec,
    plan: Plan,
    ctx: Any,
    store: Store | None,
    progress: Progress | None = None,
    *,
    job_name: str = "job",
    exact: bool = False,
    cache_dir: Path | None = None,
    credentials_dir: Path | None = None,
    limits: Limits | None = None,
    options: EngineOptions | None = None,
    pace: Pace | None = None,
    load_pipeline: Callable[..., Any] | None = None,
    generate: Callable[..., Any] | None = None,
) -> Manifest | None:
    """Run this rank's share of the job; on rank 0 write the images and ``manifest.json``.

    ``ctx`` is the runtime's DistContext (rank, world_size, device, backend). ``store`` is needed on rank 0
    only. ``progress`` receives rank 0's events. ``cache_dir`` keeps the node's model copies (default: the
    user's cache); ``credentials_dir`` holds the S3 keys of the job's objects; ``limits`` bound its prompts.
    ``options`` and ``pace`` go to the engine (``generate``). ``load_pipeline``/``generate`` default to the
    engine's (tests substitute fakes). Returns the manifest on rank 0 and None on the other ranks.
    """
    if load_pipeline is None:
        from stadi_worker.job.loading import load_pipeline as load

        load_pipeline = partial(load, credentials_dir=credentials_dir)
    workspace = None
    if generate is None:
        from stadi_worker.engine.bands import Workspace
        from stadi_worker.engine.generate import generate as generate_one

        # one workspace for the job: the plan's band wrappers and CUDA graphs are built for the first image
        workspace = Workspace(options or EngineOptions())
        generate = partial(generate_one, workspace=workspace, pace=pace)
    rank = ctx.rank
    lead = rank == 0
    if lead and store is None:
        raise ValueError("rank 0 needs an output store")
    emit: Progress = progress if (lead and progress is not None) else (lambda _event: None)
    started, t0 = now(), time.perf_counter()

    # Rank 0 reads the prompts and checks the output once; everyone follows its answer, so all ranks run
    # the same collectives even if the output changes (or is unreachable from a worker) meanwhile.
    todo: list[int] = []
    prompts: list[str] = []
    if lead:
        assert store is not None
        prompts = load_prompts(spec, credentials_dir, limits)
        todo = [i for i in range(len(prompts)) if not store.exists(image_name(i, spec.output.format))]
    prompts, todo = _broadcast((prompts, todo), ctx)
    total, skipped = len(prompts), len(prompts) - len(todo)
    if skipped:
        log.info("images already in the output are skipped", extra={"skipped": skipped, "total": total})
    emit(ProgressEvent("start", 0, spec.steps, skipped, total, skipped))

    pipe = None
    if todo:
        t_load = time.perf_counter()
        pipe = load_pipeline(spec.model, ctx.device, cache_dir or models_dir(DEFAULT_CACHE))
        load_s = time.perf_counter() - t_load
    else:
        load_s = 0.0

    records: dict[int, ImageRecord] = {}
    step_ms: list[float] = []
    final_plan = plan
    measured: dict[str, Any] = {}  # the first image's warmup profile (re-plan happens once per job)
    done = skipped
    write_s = 0.0
    t_gen = time.perf_counter()
    for i in todo:
        seed = spec.seed + i
        name = image_name(i, spec.output.format)

        def on_step(step: int, *_: Any, _done: int = done) -> None:
            emit(ProgressEvent("step", min(int(step), spec.steps), spec.steps, _done, total, skipped))

        def on_replan(res: Any, _done: int = done) -> None:
            p = res.plan
            # the steps done are the warmup of the plan the image began with (a re-planned single has none)
            emit(ProgressEvent("replan", min(plan.warmup_steps, spec.steps), spec.steps,
                               _done, total, skipped, speeds=res.measured_speeds, strategy=p.strategy,
                               strides=[r.stride for r in p.ranks], rows=[list(r.rows) for r in p.ranks],
                               replanned=res.replanned))

        t_img = time.perf_counter()
        first = not measured
        result = generate(pipe, spec, final_plan, ctx, prompts[i], seed, exact=exact, on_step=on_step,
                          **({"replan_after_warmup": True, "on_replan": on_replan} if first else {}))
        seconds = time.perf_counter() - t_img
        step_ms.extend(float(t) for t in (getattr(result, "step_ms", None) or []))
        final_plan = getattr(result, "plan", None) or final_plan  # a re-planning core reports its plan
        if first:
            measured = {"measured_speeds": getattr(result, "measured_speeds", None),
                        "predicted_gain": getattr(result, "predicted_gain", None),
                        "replanned": bool(getattr(result, "replanned", False))}
        if lead:
            assert store is not None
            t_write = time.perf_counter()
            # Written now, not at the end: a failure on a later prompt keeps this image.
            uri = store.put(name, encode_image(result.image, spec.output.format))
            write_s += time.perf_counter() - t_write
            records[i] = ImageRecord(index=i, prompt=prompts[i], seed=seed, name=name, uri=uri,
                                     seconds=round(seconds, 4))
            done += 1
            emit(ProgressEvent("image", spec.steps, spec.steps, done, total, skipped, uri=uri))
            log.info("image written", extra={"uri": uri, "done": done, "total": total, "seconds": round(seconds, 3)})
    generate_s = time.perf_counter() - t_gen - write_s
    if workspace is not None:
        workspace.close()

    mine = RankRecord.measure(rank, device_name(ctx.device), step_ms, socket.gethostname())
    ranks = _gather(mine, ctx)
    if not lead:
        return None
    assert store is not None and ranks is not None
    fmt = spec.output.format
    for i in range(total):
        if i not in records:
            name = image_name(i, fmt)
            records[i] = ImageRecord(index=i, prompt=prompts[i], seed=spec.seed + i, name=name,
                                     uri=store.uri(name), skipped=True)
    manifest = Manifest(
        job=job_name,
        model=spec.model,
        output=store.base_uri,
        format=fmt,
        height=spec.height,
        width=spec.width,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        negative_prompt=spec.negative_prompt,
        scheduler=spec.scheduler,
        seed=spec.seed,
        exact=exact,
        images=[records[i] for i in range(total)],
        plan=PlanRecord(initial=plan, final=final_plan, **measured),
        ranks=sorted(ranks, key=lambda r: r.rank),
        timings=Timings(
            load_s=round(load_s, 4),
            generate_s=round(generate_s, 4),
            write_s=round(write_s, 4),
            total_s=round(time.perf_counter() - t0, 4),
            started=started,
            finished=now(),
        ),
        versions=Versions.current(),
    )
    store.put(MANIFEST_NAME, manifest.to_json())
    emit(ProgressEvent("done", spec.steps, spec.steps, total, total, skipped, uri=store.uri(MANIFEST_NAME)))
    return manifest
