"""The rank side of ``stadi bench speed``: every model and strategy of one heterogeneity level on this rank.

``python -m stadi_bench.speed_rank CONFIG.json`` on every rank (launched by ``speed.launch_level``): each model
loads once and every strategy reuses the loaded pipeline and one workspace (its graphs are captured once).
Latency is wall time from the first to the last rank's return (text encoding and denoising loop, final latent
gathered, no VAE decode, as the peer measures); each figure is the median of ``runs`` runs after
``warmup_runs`` untimed ones. Rank 0 writes the level's report to ``config["out"]`` after every strategy.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from stadi_worker.cli.emulate import pacer
from stadi_worker.engine.bands import Workspace
from stadi_worker.engine.generate import generate
from stadi_worker.engine.replan import in_process_order, step_cost_at_unit_speed
from stadi_worker.engine.runtime import init_from_env, shutdown
from stadi_worker.engine.serial import generate_serial
from stadi_worker.job.loading import load_pipeline
from stadi_worker.models import ops_for
from stadi_worker.settings import WorkerSettings

from stadi.api import DiffusionJobSpec
from stadi.planner import LINKS, Device, PlanRequest, plan
from stadi_bench.metrics import psnr, ssim


def _sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gather(ctx: Any, obj: Any) -> list[Any]:
    if ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _barrier(ctx: Any) -> None:
    if ctx.world_size > 1:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def _plan_for(spec: Any, name: str, world: int, speeds: list[float] | None, gpu: str) -> Any:
    """The plan of strategy ``name`` on ``world`` ranks (``speeds``: measured, None: the catalogue's)."""
    link = LINKS["pcie"] if gpu.upper().startswith("CPU") else None
    request = replace(PlanRequest.from_spec(spec, link), strategy=name, gpus_min=world, gpus_max=world)
    pool = [Device(gpu, node="local", index=i, speed=(speeds[i] if speeds else (1.0 if gpu == "CPU" else None)))
            for i in range(world)]
    p = in_process_order(plan(request, pool), list(range(world)))  # our rank r runs device index r
    p.validate_for(world)
    return p


def _describe(p: Any) -> dict[str, Any]:
    return {"strategy": p.strategy, "rows": [list(r.rows) for r in p.ranks], "strides": [r.stride for r in p.ranks],
            "branches": [r.branch for r in p.ranks], "sync_period": p.sync_period,
            **({"idle": [r.rank for r in p.ranks if r.idle]} if len(p.active) < p.world_size else {})}


def _one_run(ctx: Any, fn: Any) -> tuple[Any, float]:
    _barrier(ctx)
    _sync(ctx.device)
    t0 = time.perf_counter()
    res = fn()
    _sync(ctx.device)
    return res, (time.perf_counter() - t0) * 1e3


def _measure(ctx: Any, fn: Any, warmup_runs: int, runs: int) -> dict[str, Any]:
    """Run ``fn`` warmup_runs + runs times on every rank; per timed run every rank's wall and step times."""
    for _ in range(warmup_runs):
        _one_run(ctx, fn)
    walls, steps, waits = [], [], []
    first = None
    for i in range(runs):
        res, wall = _one_run(ctx, fn)
        if i == 0:
            first = res
        every = _gather(ctx, (wall, [round(x, 3) for x in res.step_ms], [round(x, 3) for x in res.wait_ms]))
        walls.append([round(e[0], 3) for e in every])
        steps.append([e[1] for e in every])
        waits.append([e[2] for e in every])
    lat = [max(w) for w in walls]
    return {"latency_ms": round(statistics.median(lat), 3), "latency_runs_ms": lat, "wall_ms": walls,
            "step_ms": steps, "wait_ms": waits, "_first": first}


def _breakdown(entry: dict[str, Any]) -> list[dict[str, float]]:
    """Per rank, medians over the timed runs: denoiser compute, blocked in collectives, everything else."""
    out = []
    for r in range(len(entry["wall_ms"][0])):
        comp, wait, other = [], [], []
        for run in range(len(entry["wall_ms"])):
            s, w = sum(entry["step_ms"][run][r]), sum(entry["wait_ms"][run][r])
            comp.append(s - w)
            wait.append(w)
            other.append(entry["wall_ms"][run][r] - s)
        steps = entry["step_ms"][0][r]
        out.append({"compute_ms": round(statistics.median(comp), 2), "comm_wait_ms": round(statistics.median(wait), 2),
                    "other_ms": round(statistics.median(other), 2), "evals": len(steps),
                    "median_step_ms": round(statistics.median(steps), 3) if steps else 0.0})
    return out


def run_rank(config: dict[str, Any]) -> None:
    """Every model and strategy of one level on this rank; rank 0 writes ``config['out']``. The engine's
    switches and the process group's timeouts are the worker's settings (the environment)."""
    settings = WorkerSettings()
    threads = config.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    ctx = init_from_env(config["device"], settings.dist_timeout_s)
    slow = {int(k): float(v) for k, v in (config.get("slowdown") or {}).items()}
    factor = slow.get(ctx.rank, 1.0)
    gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "CPU"
    gpus = _gather(ctx, gpu)
    catalogue_gpu = "H200" if ctx.device.type == "cuda" and all("H200" in g for g in gpus) else (
        "H100" if ctx.device.type == "cuda" else "CPU")
    report: dict[str, Any] = {"level": config["level"], "gpus": gpus, "models": {}}
    prompt, seed = config["prompt"], config["seed"]

    def save() -> None:  # after every strategy: a later failure or timeout keeps the figures measured so far
        if ctx.rank == 0:
            Path(config["out"]).write_text(json.dumps(report, indent=1))
    try:
        for model_doc in config["models"]:
            spec = DiffusionJobSpec.model_validate(model_doc)
            family = spec.model.family
            t_load = time.perf_counter()
            pipe = load_pipeline(spec.model, ctx.device, Path(config["cache_dir"]))
            if ctx.device.type == "cuda":
                pipe.vae.to(torch.float32)  # decode for fidelity only (untimed); fp16 VAEs overflow
            load_s = time.perf_counter() - t_load
            ops = ops_for(pipe, family)
            ws = Workspace(settings.engine)  # one per pipeline: the graphs of every strategy are captured once
            res: dict[str, Any] = {"load_s": round(load_s, 2), "strategies": {}}
            report["models"][family] = res
            images: dict[str, Any] = {}
            world = ctx.world_size
            warm, runs = int(config["warmup_runs"]), int(config["runs"])

            def slow_serial(spec: Any = spec, pipe: Any = pipe, ws: Any = ws) -> Any:
                if factor > 1.0 and ctx.device.type == "cpu":
                    # CPU emulation of a slow device for the single-GPU time: pace every step
                    return _paced_serial(pipe, spec, prompt, seed, factor)
                return generate_serial(pipe, spec, prompt, seed, decode=False, workspace=ws)

            # single: every rank alone at once (rank 0 at full speed is the fastest GPU)
            entry = _measure(ctx, slow_serial, warm, runs)
            first = entry.pop("_first")
            if ctx.rank == 0:
                images["single"] = ops.decode_tensor(first.latents)
            entry["breakdown"] = _breakdown(entry)
            entry["latency_runs_ms"] = [r[0] for r in entry["wall_ms"]]  # rank 0 alone: the fastest GPU
            entry["latency_ms"] = round(statistics.median(entry["latency_runs_ms"]), 3)
            entry["per_rank_latency_ms"] = [round(statistics.median(r[i] for r in entry["wall_ms"]), 3)
                                            for i in range(world)]
            step_med = [statistics.median(s for run in entry["step_ms"] for s in run[i]) for i in range(world)]
            entry["per_rank_step_ms"] = [round(s, 3) for s in step_med]
            res["strategies"]["single"] = entry
            # speeds on the catalogue's scale from the full-frame serial steps
            serial_plan = _plan_for(spec, "patch", world, None, catalogue_gpu) if world > 1 else None
            if serial_plan is not None:
                full = serial_plan.model_copy(update={"ranks": [serial_plan.ranks[0].model_copy(
                    update={"rows": (0, serial_plan.latent_height)})]})
                unit = step_cost_at_unit_speed(full, 0, spec.uses_cfg, spec.model.compile)
            else:
                unit = 1.0
            speeds = [unit / max(s, 1e-6) for s in step_med]
            res["measured_speeds"] = [round(v, 6) for v in speeds]
            v = [1.0 / max(s, 1e-9) for s in step_med]
            fastest = max(range(world), key=lambda i: v[i])
            t_fast = entry["per_rank_latency_ms"][fastest]
            res["ideal_ms"] = round(t_fast * v[fastest] / sum(v), 3)
            if world > 1:
                for name in config["strategies"]:
                    if name == "single":
                        continue
                    try:
                        p = _plan_for(spec, name, world, speeds if name in ("stadi", "hybrid") else None,
                                      catalogue_gpu)
                    except ValueError as error:
                        res["strategies"][name] = {"error": str(error)}
                        continue
                    replan_flag = name == "auto"

                    def fn(p: Any = p, replan_flag: bool = replan_flag, spec: Any = spec, pipe: Any = pipe,
                           ws: Any = ws) -> Any:
                        return generate(pipe, spec, p, ctx, prompt, seed, replan_after_warmup=replan_flag,
                                        pace=pacer(factor, ctx.device), decode=False, workspace=ws)

                    try:
                        entry = _measure(ctx, fn, warm, runs)
                    except Exception as error:  # one strategy failing must not lose the others' figures
                        if ctx.world_size > 1:
                            raise
                        res["strategies"][name] = {"error": f"{type(error).__name__}: {error}"}
                        continue
                    first = entry.pop("_first")
                    entry["plan"] = _describe(p)
                    if first.plan is not None and first.plan is not p:
                        entry["final_plan"] = _describe(first.plan)
                    if first.measured_speeds is not None:
                        entry["warmup_speeds"] = first.measured_speeds
                    entry["breakdown"] = _breakdown(entry)
                    if ctx.rank == 0:
                        images[name] = ops.decode_tensor(first.latents)
                    res["strategies"][name] = entry
                    save()
            if ctx.rank == 0:
                ref = images["single"]
                for name, img in images.items():
                    if name == "single":
                        continue
                    res["strategies"][name]["psnr"] = round(min(psnr(img, ref), 100.0), 3)
                    res["strategies"][name]["ssim"] = round(ssim(img, ref), 6)
            save()
            ws.close()
            del pipe, ops, images, ws
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            _barrier(ctx)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        # leaving the process group waits for peers that may be stuck in a collective: exit at once
        os._exit(1)
    shutdown(ctx, settings.teardown_s)


def _paced_serial(pipe: Any, spec: Any, prompt: str, seed: int, factor: float) -> Any:
    """generate_serial with CPU pacing of every step (the CPU stand-in for a slower device's single time)."""
    res = generate_serial(pipe, spec, prompt, seed, decode=False)
    total = sum(res.step_ms)
    time.sleep((factor - 1.0) * total / 1e3)
    res.step_ms = [s * factor for s in res.step_ms]
    return res


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stadi_bench.speed_rank CONFIG.json", file=sys.stderr)
        return 2
    run_rank(json.loads(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
