"""``stadi bench fidelity``: PSNR and SSIM of parallel plans against the serial run of the same seed.

For one model (family + source), resolution and step count, every plan in ``--plans`` runs on N local ranks
(through :mod:`stadi_bench.parity`) next to the serial reference; the decoded images (floats in [0, 1], no
8-bit rounding) are compared. Plans: ``exact`` (equal bands, synchronous every step), ``patch`` (equal bands,
stale after warmup), ``cfg`` (condition split, 2 ranks), ``stadi`` (the planner's stadi plan on equal
devices), ``stadi:K0-K1-...`` (strides K per rank, with the elastic rows of devices of speed 1/K, which
are equal rows), or a Plan JSON file.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stadi.api import DiffusionJobSpec, Plan
from stadi_bench.metrics import psnr, ssim

Launcher = Callable[[int, dict[str, Any], Path], None]


def make_plans(spec: DiffusionJobSpec, names: list[str], ranks: int) -> list[dict[str, Any]]:
    """The parity runs (name, plan document, exact) for ``names`` on ``ranks`` equal ranks."""
    from stadi.planner import LINKS, Device, PlanRequest, plan

    pool = [Device("H100", node="local", index=i, speed=1.0) for i in range(ranks)]
    base = replace(PlanRequest.from_spec(spec, LINKS["nvlink"]), gpus_min=ranks, gpus_max=ranks)
    runs = []
    for name in names:
        name = name.strip()
        exact = name == "exact"
        if name.endswith(".json"):
            p = Plan.model_validate_json(Path(name).read_text())
        elif name in ("exact", "patch", "cfg", "stadi", "stadi+cfg"):
            p = plan(replace(base, strategy="patch" if exact else name), pool)
        elif name.startswith("stadi:"):
            strides = [int(k) for k in name.removeprefix("stadi:").split("-")]
            if len(strides) != ranks or min(strides) < 1:
                raise ValueError(f"plan {name!r}: need {ranks} strides >= 1")
            p = plan(replace(base, strategy="patch"), pool)
            ranks_doc = [r.model_copy(update={"stride": k}) for r, k in zip(p.ranks, strides, strict=True)]
            p = p.model_copy(update={"strategy": "stadi", "ranks": ranks_doc, "sync_period": math.lcm(*strides)})
        else:
            raise ValueError(f"unknown plan {name!r}: exact, patch, cfg, stadi, stadi:K0-K1-..., or FILE.json")
        p.validate_for(ranks)
        runs.append({"name": name, "plan": p.model_dump(mode="json"), "exact": exact})
    return runs


def subprocess_launcher(world: int, config: dict[str, Any], workdir: Path) -> None:
    """Run ``python -m stadi_bench.parity`` on ``world`` local ranks (Gloo on CPU, NCCL on CUDA)."""
    from stadi_worker.cli.ranks import python_module, run_ranks

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    env = {}
    if config.get("device", "cpu") == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    outcome = run_ranks(python_module("stadi_bench.parity", str(path)), world, workdir / "ranks", None, env=env,
                        redirect=False)
    if not outcome.ok:
        why = outcome.failure.message if outcome.failure else f"exit codes {outcome.codes}"
        raise RuntimeError(f"fidelity ranks failed: {why}")


def run_fidelity(spec: DiffusionJobSpec, plans: list[str], ranks: int, *, prompt: str, seed: int, device: str,
                 cache_dir: Path, workdir: Path, launcher: Launcher = subprocess_launcher) -> list[dict[str, Any]]:
    """Run the serial reference and every plan; one row per plan with psnr and ssim of the decoded image."""
    runs = make_plans(spec, plans, ranks)
    config = {"spec": spec.model_dump(by_alias=True, mode="json", exclude_none=True), "prompt": prompt,
              "seed": seed, "device": device, "cache_dir": str(cache_dir), "out": str(workdir / "out"),
              "runs": [{"name": "serial", "plan": None}, *runs]}
    launcher(ranks, config, workdir)
    ref = torch.load(workdir / "out" / "serial.pt")
    rows = []
    for run in runs:
        res = torch.load(workdir / "out" / f"{run['name']}.pt")
        plan = res["plan"]
        rows.append({
            "plan": run["name"], "strategy": plan["strategy"], "strides": [r["stride"] for r in plan["ranks"]],
            "rows": [list(r["rows"]) for r in plan["ranks"]], "exact": run["exact"],
            # PSNR capped at 100 dB (identical images) so that the JSON stays standard
            "psnr": round(min(psnr(res["image"], ref["image"]), 100.0), 3),
            "ssim": round(ssim(res["image"], ref["image"]), 6),
            "latent_max_abs": float((res["latents"] - ref["latents"]).abs().max()),
            "evals": [len(e) for e in res["evals"]],
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the rows."""
    lines = [f"{'plan':<16} {'strategy':<10} {'strides':<10} {'evals':<10} {'PSNR dB':>8} {'SSIM':>8}"]
    for r in rows:
        lines.append(f"{r['plan']:<16} {r['strategy']:<10} {'-'.join(map(str, r['strides'])):<10} "
                     f"{'/'.join(map(str, r['evals'])):<10} {r['psnr']:>8.2f} {r['ssim']:>8.4f}")
    return "\n".join(lines)


def command(args: Any) -> int:
    """``stadi bench fidelity``."""
    from stadi_worker.settings import WorkerSettings

    doc = {
        "model": {"family": args.family, "source": args.source, "dtype": args.dtype},
        "prompts": [args.prompt], "height": args.height, "width": args.width or args.height, "steps": args.steps,
        "guidanceScale": args.guidance, "seed": args.seed, "scheduler": args.scheduler,
        "parallelism": {"warmupSteps": args.warmup, "minEffectiveSteps": 1, "maxStride": 16},
        "output": {"uri": "file:///tmp/stadi-fidelity"},
    }
    try:
        spec = DiffusionJobSpec.model_validate(doc)
    except ValueError as error:
        print(f"stadi bench fidelity: {error}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="stadi-fidelity-") as tmp:
        rows = run_fidelity(spec, [p for p in args.plans.split(",") if p.strip()], args.ranks, prompt=args.prompt,
                            seed=args.seed, device=device,
                            cache_dir=Path(args.cache_dir) if args.cache_dir else WorkerSettings().models_dir,
                            workdir=Path(tmp))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": doc, "ranks": args.ranks, "device": device,
                                               "results": rows}, indent=2) + "\n")
    return 0
