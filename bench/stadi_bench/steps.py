"""``stadi bench steps``: one GPU, one family. What compiling the engine's steps gives and costs:

- the single-GPU worker (``generate_serial``, compiled, CUDA graphs) against the same compiled denoiser captured
  and replayed by hand around the same scheduler: the engine's overhead (issue 16's target: within 3%);
- the time of the first image (the compile included) and of the next, in this process: run twice with the
  same ``TORCHINDUCTOR_CACHE_DIR`` for the compile cold and from the cache;
- the step of one band inside the engine (its wrappers reading the other band's context, as a window's local
  step does) per band height and batch, as a CUDA graph and compiled inside it. The other band is this rank's
  own tensor looped back (``LoopbackComm``): one GPU measures the compute of a band step with its context.

Writes one JSON (``--out``); the command line is stored in it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from stadi.api import DiffusionJobSpec, Plan, RankPlan
from stadi.families import GUIDANCE_DISTILLED, profile


def _spec(family: str, size: str, height: int, steps: int) -> DiffusionJobSpec:
    """The measured job: guidance 5 (two branches), or FLUX.1-dev's distilled 3.5 (one)."""
    return DiffusionJobSpec.model_validate({
        "model": {"family": family, "source": f"random://{size}", "dtype": "float16", "compile": True},
        "prompts": ["a lighthouse on a cliff at dusk"], "height": height, "width": height, "steps": steps,
        "guidanceScale": 3.5 if family in GUIDANCE_DISTILLED else 5.0, "output": {"uri": "file:///tmp/stadi-steps"}})


def _image_s(fn: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def by_hand(ops: Any, spec: DiffusionJobSpec, denoiser: Any) -> float:
    """Seconds of one image: the prompt encoded, then ``denoiser`` (compiled) captured by hand as one CUDA graph
    of the guided step, replayed at every step, the scheduler stepping in between; no engine."""
    from stadi_worker.engine.bands import guide
    from stadi_worker.engine.sampling import initial_noise, job_sampler
    from stadi_worker.models.base import batch_branches

    branches = ["uncond", "cond"] if spec.uses_cfg else ["cond"]
    with torch.no_grad():
        cond = batch_branches(ops.encode(spec, spec.prompts[0], spec.uses_cfg), branches)
        sampler = job_sampler(ops, spec)
        x = initial_noise(ops.latent_shape(spec), 0, sampler.init_noise_sigma).to(ops.device, ops.dtype)
        static_x, static_t = x.clone(), sampler.timesteps[0].clone()

        def step() -> torch.Tensor:
            out = ops(torch.cat([static_x] * len(branches)), static_t, cond, denoiser=denoiser)
            return guide(*out.chunk(2), spec.guidance_scale) if spec.uses_cfg else out

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eps = step()

        def image() -> None:
            # the prompt is encoded inside the timed image, as the worker's image encodes it
            for key, value in batch_branches(ops.encode(spec, spec.prompts[0], spec.uses_cfg), branches).items():
                cond[key].copy_(value)
            latents = x
            for index in range(spec.steps):
                static_x.copy_(sampler.scale(latents, index))
                static_t.copy_(sampler.timesteps[index])
                graph.replay()
                latents = sampler.step(eps.clone(), index, latents)

        image()
        return statistics.median(_image_s(image) for _ in range(3))


def band_plan(family: str, latent: int, rows: int, guidance: bool = True, text: bool = True) -> Plan:
    """Two bands: ours [0, rows) and the rest; the planner's granularity. ``text`` False: in a family whose bands
    share the text stream, ours is not the text band (it takes stride 2, so the other band is)."""
    fam = profile(family)
    ranks = [RankPlan(rank=0, gpu="H200", speed=1.0, rows=(0, rows), stride=1 if text else 2),
             RankPlan(rank=1, gpu="H200", speed=1.0, rows=(rows, latent))]
    return Plan(strategy="patch" if text else "stadi", family=family, latent_height=latent, latent_width=latent,
                granularity=fam.granularity, steps=50, guidance=guidance, ranks=ranks, predicted_seconds=1.0,
                sync_period=1 if text else 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stadi_bench.steps", description=__doc__.split("\n")[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--size", default="full", choices=["tiny", "full"])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rows", default="128,80,64,48", help="band heights in latent rows")
    parser.add_argument("--batches", default="2,1")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-bands", action="store_true")
    parser.add_argument("--without-text", action="store_true",
                        help="Flux: measure a band that is not its group's text band (no text tokens)")
    parser.add_argument("--skip-images", action="store_true", help="band steps only (no whole images)")
    parser.add_argument("--cache-dir", default="/tmp/stadi-cache")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from stadi_worker.engine.serial import generate_serial
    from stadi_worker.job.loading import load_pipeline
    from stadi_worker.models import ops_for

    device = torch.device("cuda")
    spec = _spec(args.family, args.size, args.height, args.steps)
    report: dict[str, Any] = {"command": " ".join(["python -m stadi_bench.steps", *(argv or sys.argv[1:])]),
                              "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                              "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                              "family": args.family, "height": args.height, "steps": args.steps}
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(report, indent=1))

    t0 = time.perf_counter()
    pipe = load_pipeline(spec.model, device, Path(args.cache_dir))
    report["load_s"] = round(time.perf_counter() - t0, 2)
    ops = ops_for(pipe, args.family)

    def image(ws: Any) -> Any:
        return generate_serial(pipe, spec, spec.prompts[0], 0, decode=False, workspace=ws)

    if not args.skip_images:
        images(report, save, image, ops, spec)
    if not args.skip_bands:
        report["bands"] = []
        bands(ops, spec, args, report["bands"], save)
    print(json.dumps({k: v for k, v in report.items() if k != "bands"}, indent=1))
    for entry in report.get("bands", []):
        print(entry)
    return 0


def images(report: dict[str, Any], save: Any, image: Any, ops: Any, spec: DiffusionJobSpec) -> None:
    """Whole images on one GPU: the worker compiled (first image and later ones), by hand, and graphed."""
    from stadi_worker.engine.bands import Workspace
    from stadi_worker.engine.options import EngineOptions

    compiled_ws = Workspace(EngineOptions(compile="1"))
    first = _image_s(lambda: image(compiled_ws))
    later = [_image_s(lambda: image(compiled_ws)) for _ in range(3)]
    steps_ms = image(compiled_ws).step_ms
    report["worker_compiled"] = {"first_image_s": round(first, 3), "image_s": round(statistics.median(later), 4),
                                 "compile_s": round(first - statistics.median(later), 2),
                                 "step_ms": round(statistics.median(steps_ms), 3)}
    save()
    hand = by_hand(ops, spec, compiled_ws.step_denoiser(ops, spec))
    report["hand_compiled"] = {"image_s": round(hand, 4)}
    report["worker_over_hand"] = round(statistics.median(later) / hand, 4)
    save()
    graphed_ws = Workspace(EngineOptions(compile="0"))
    image(graphed_ws)
    report["worker_graphed"] = {"image_s": round(statistics.median(_image_s(lambda: image(graphed_ws))
                                                                   for _ in range(3)), 4),
                                "step_ms": round(statistics.median(image(graphed_ws).step_ms), 3)}
    save()
    graphed_ws.close()
    compiled_ws.close()


def bands(ops: Any, spec: DiffusionJobSpec, args: argparse.Namespace, found: list[dict[str, Any]],
          save: Any) -> None:
    """One band's step per height and batch, graphed and compiled, appended to ``found`` (saved after each);
    ``eager_keys`` counts the step keys whose capture failed for good (their times are not a graph's)."""
    from stadi_worker.engine.bands import Workspace
    from stadi_worker.engine.options import EngineOptions

    from stadi_bench.band_steps import band_step_ms

    latent = args.height // profile(args.family).vae_factor
    # a guidance-distilled family has one branch: batch 1 only
    for batch in (int(b) for b in args.batches.split(",") if spec.uses_cfg or b.strip() == "1"):
        # one workspace per kind and batch, as a job keeps one: a compile serves every later band height
        spaces = {"graphed": Workspace(EngineOptions(compile="0")), "compiled": Workspace(EngineOptions(compile="1"))}
        for rows in (int(r) for r in args.rows.split(",")):
            entry: dict[str, Any] = {"batch": batch, "rows": rows, "text": not args.without_text}
            for key, ws in spaces.items():
                start = time.perf_counter()
                plan = band_plan(args.family, latent, rows, spec.uses_cfg, text=not args.without_text)
                ms = band_step_ms(ops, spec, plan, ws, batch, args.repeats)
                entry[f"{key}_ms"] = {phase: round(v, 3) for phase, v in ms.items()}
                entry[f"{key}_setup_s"] = round(time.perf_counter() - start, 2)
                entry[f"{key}_eager_keys"] = ws.graphs.eager_keys if ws.graphs is not None else 0
            found.append(entry)
            save()
        for ws in spaces.values():
            ws.close()


if __name__ == "__main__":
    sys.exit(main())
