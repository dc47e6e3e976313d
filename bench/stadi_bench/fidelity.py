"""``stadi bench fidelity``: PSNR and SSIM of parallel plans against the serial run of the same seed.

For one model (family + source), resolution and step count, every plan in ``--plans`` runs on N local ranks
(through :mod:`stadi_bench.parity`) next to the serial reference; the decoded images (floats in [0, 1], no
8-bit rounding) are compared. Plans: ``exact`` (equal bands, synchronous every step), ``patch`` (equal bands,
stale after warmup), ``cfg`` (condition split, 2 ranks), ``stadi`` (the planner's stadi plan on equal
devices), ``stadi:K0-K1-...`` (strides K per rank, with the elastic rows of devices of speed 1/K, which
are equal rows), ``cfg-stride:1-K`` (the condition split, the cond rank 0 at every step and the uncond rank 1
at stride K: branch strides), ``cfg-stride+band:1-K`` (the same with the uncond branch in two equal bands, the
top one on rank 0), or a Plan JSON file.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
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
        elif name in ("exact", "patch", "cfg", "stadi", "stadi+cfg", "hybrid"):
            p = plan(replace(base, strategy="patch" if exact else name), pool)
        elif name.startswith("stadi:"):
            strides = [int(k) for k in name.removeprefix("stadi:").split("-")]
            if len(strides) != ranks or min(strides) < 1:
                raise ValueError(f"plan {name!r}: need {ranks} strides >= 1")
            p = plan(replace(base, strategy="patch"), pool)
            ranks_doc = [r.model_copy(update={"stride": k}) for r, k in zip(p.ranks, strides, strict=True)]
            p = p.model_copy(update={"strategy": "stadi", "ranks": ranks_doc, "sync_period": math.lcm(*strides)})
        elif name.startswith(("cfg-stride:", "cfg-stride+band:")):
            strategy, _, given = name.partition(":")
            strides = [int(k) for k in given.split("-")]
            if ranks != 2 or len(strides) != 2 or strides[0] != 1 or strides[1] < 1:
                raise ValueError(f"plan {name!r}: need 2 ranks and strides 1-K (cond, uncond), K >= 1")
            p = plan(replace(base, strategy="cfg"), pool)  # rank 0 cond, rank 1 uncond
            ranks_doc = [r.model_copy(update={"stride": strides[r.rank]}) for r in p.ranks]
            if strategy == "cfg-stride+band":  # the uncond branch in two equal bands, the top one on rank 0
                half = p.latent_height // p.granularity // 2 * p.granularity
                ranks_doc = [ranks_doc[0].model_copy(update={"uncond_rows": (0, half)}),
                             ranks_doc[1].model_copy(update={"rows": (half, p.latent_height)})]
            p = p.model_copy(update={"strategy": strategy, "ranks": ranks_doc, "sync_period": strides[1]})
        else:
            raise ValueError(f"unknown plan {name!r}: exact, patch, cfg, hybrid, stadi, stadi:K0-K1-..., "
                             "cfg-stride:1-K, cfg-stride+band:1-K, or FILE.json")
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


def band_edges(plan: dict[str, Any], vae_factor: int) -> list[int]:
    """The pixel rows where one rank's band meets another's (none for a plan without bands)."""
    starts = {r["rows"][0] for r in plan["ranks"] if not r.get("idle") and r["rows"][1] > r["rows"][0]}
    return sorted(start * vae_factor for start in starts if start > 0)


def seam_score(image: torch.Tensor, reference: torch.Tensor, edges: list[int]) -> float | None:
    """The image's gradient energy across the band edges over the same on the reference: the mean squared
    difference between the two pixel rows that meet at each edge (1.0: no seam; None: no edge)."""
    if not edges:
        return None

    def energy(img: torch.Tensor) -> float:
        return float(sum((img[..., y, :] - img[..., y - 1, :]).square().mean() for y in edges))

    return energy(image) / max(energy(reference), 1e-12)


def run_fidelity(spec: DiffusionJobSpec, plans: list[str], ranks: int, *, device: str, cache_dir: Path,
                 workdir: Path, cases: list[tuple[str, int]] | None = None, prompt: str = "", seed: int = 0,
                 launcher: Launcher = subprocess_launcher) -> list[dict[str, Any]]:
    """Run the serial reference and every plan on every case (prompt, seed; default one: ``prompt``, ``seed``);
    one row per plan: PSNR, SSIM and (for plans with bands) the seam score against the serial image, averaged
    over the cases, and each case's figures."""
    from stadi.families import profile

    runs = make_plans(spec, plans, ranks)
    cases = cases or [(prompt, seed)]
    config = {"spec": spec.model_dump(by_alias=True, mode="json", exclude_none=True),
              "cases": [{"prompt": p, "seed": s} for p, s in cases], "device": device, "cache_dir": str(cache_dir),
              "out": str(workdir / "out"), "runs": [{"name": "serial", "plan": None}, *runs]}
    launcher(ranks, config, workdir)
    factor = profile(spec.model.family).vae_factor
    rows = []
    for run in runs:
        per_case = []
        for i in range(len(cases)):
            ref = torch.load(workdir / "out" / f"serial@{i}.pt")
            res = torch.load(workdir / "out" / f"{run['name']}@{i}.pt")
            seam = seam_score(res["image"], ref["image"], band_edges(res["plan"], factor))
            # PSNR capped at 100 dB (identical images) so that the JSON stays standard
            per_case.append({"psnr": round(min(psnr(res["image"], ref["image"]), 100.0), 3),
                             "ssim": round(ssim(res["image"], ref["image"]), 6),
                             "seam": None if seam is None else round(seam, 4),
                             "latent_max_abs": float((res["latents"] - ref["latents"]).abs().max())})
        plan = res["plan"]
        seams = [c["seam"] for c in per_case if c["seam"] is not None]
        rows.append({
            "plan": run["name"], "strategy": plan["strategy"], "strides": [r["stride"] for r in plan["ranks"]],
            "rows": [list(r["rows"]) for r in plan["ranks"]], "exact": run["exact"],
            "psnr": round(statistics.mean(c["psnr"] for c in per_case), 3),
            "ssim": round(statistics.mean(c["ssim"] for c in per_case), 6),
            "seam": round(statistics.mean(seams), 4) if seams else None,
            "latent_max_abs": max(c["latent_max_abs"] for c in per_case),
            "evals": [len(e) for e in res["evals"]], "cases": per_case,
        })
    return rows


def fidelity_grid(workdir: Path, rows: list[dict[str, Any]], family: str, path: Path, cases: int = 4) -> None:
    """A PNG: for the first ``cases`` cases, the serial image next to each plan's, band edges marked in red."""
    from PIL import Image, ImageDraw

    from stadi.families import profile

    factor = profile(family).vae_factor
    names = ["serial", *(r["plan"] for r in rows)]
    tiles: list[list[Any]] = []
    for i in range(cases):
        line = []
        for name in names:
            res = torch.load(workdir / "out" / f"{name}@{i}.pt")
            image = Image.fromarray((res["image"][0].permute(1, 2, 0) * 255).round().byte().numpy())
            draw = ImageDraw.Draw(image)
            for y in band_edges(res["plan"], factor) if "plan" in res else []:
                # ticks in the margins: a line across would hide the seam it marks
                for x0 in (0, image.width - 12):
                    draw.line([(x0, y), (x0 + 11, y)], fill=(255, 0, 0), width=3)
            line.append(image)
        tiles.append(line)
    w, h = tiles[0][0].size
    label = 14
    grid = Image.new("RGB", (w * len(names), label + h * len(tiles)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(names):
        draw.text((j * w + 4, 1), name, fill=(0, 0, 0))
        for i, line in enumerate(tiles):
            grid.paste(line[j], (j * w, label + i * h))
    grid.save(path)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the rows (means over the cases)."""
    lines = [f"{'plan':<16} {'strategy':<10} {'strides':<10} {'evals':<10} {'PSNR dB':>8} {'SSIM':>8} {'seam':>6}"]
    for r in rows:
        seam = f"{r['seam']:>6.3f}" if r.get("seam") is not None else f"{'-':>6}"
        lines.append(f"{r['plan']:<16} {r['strategy']:<10} {'-'.join(map(str, r['strides'])):<10} "
                     f"{'/'.join(map(str, r['evals'])):<10} {r['psnr']:>8.2f} {r['ssim']:>8.4f} {seam}")
    return "\n".join(lines)


def cases_of(prompts: list[str], count: int, seed: int) -> list[tuple[str, int]]:
    """``count`` cases: the prompts in turn, each case its own seed."""
    return [(prompts[i % len(prompts)], seed + i) for i in range(count)]


def command(args: Any) -> int:
    """``stadi bench fidelity``."""
    from stadi_worker.settings import WorkerSettings

    from stadi.families import HYBRID_DEFAULTS

    prompts = [p.strip() for p in args.prompt.split("|") if p.strip()]
    parallelism: dict[str, Any] = {"warmupSteps": args.warmup, "minEffectiveSteps": 1, "maxStride": 16}
    if args.family in HYBRID_DEFAULTS:
        # the pipeline window's latest start at the same share of the steps as the family's default at 50 steps
        parallelism["hybrid"] = {"capStep": round(HYBRID_DEFAULTS[args.family].cap_step * args.steps / 50)}
    doc = {
        "model": {"family": args.family, "source": args.source, "dtype": args.dtype},
        "prompts": prompts, "height": args.height, "width": args.width or args.height, "steps": args.steps,
        "guidanceScale": args.guidance, "seed": args.seed, "scheduler": args.scheduler, "parallelism": parallelism,
        "output": {"uri": "file:///tmp/stadi-fidelity"},
    }
    try:
        spec = DiffusionJobSpec.model_validate(doc)
    except ValueError as error:
        print(f"stadi bench fidelity: {error}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = cases_of(prompts, args.cases, args.seed)
    with tempfile.TemporaryDirectory(prefix="stadi-fidelity-") as tmp:
        rows = run_fidelity(spec, [p for p in args.plans.split(",") if p.strip()], args.ranks, cases=cases,
                            device=device,
                            cache_dir=Path(args.cache_dir) if args.cache_dir else WorkerSettings().models_dir,
                            workdir=Path(tmp))
        if args.grid:
            fidelity_grid(Path(tmp), rows, args.family, Path(args.grid), cases=min(4, len(cases)))
    print(format_table(rows))
    if args.json:
        command_line = shlex.join(["stadi", "bench", "fidelity", *sys.argv[sys.argv.index("fidelity") + 1:]]) if (
            "fidelity" in sys.argv) else None
        Path(args.json).write_text(json.dumps({"command": command_line, "spec": doc, "ranks": args.ranks,
                                               "device": device, "cases": [{"prompt": p, "seed": s} for p, s in cases],
                                               "results": rows}, indent=2) + "\n")
    return 0
