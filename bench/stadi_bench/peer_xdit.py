"""The peer engine of ``stadi bench speed --peer xdit``: xDiT's 2-GPU configurations on stadi's own pipeline.

Each configuration is one launch of ``stadi_bench.xdit_driver`` on the same local ranks, under the same CUDA
MPS setting of the last rank as stadi's strategies at that level; a configuration that fails or outlasts its
timeout is recorded with its error and log tail, and the others still run. The peer's figure at a level is its
best configuration there. Configurations and the PipeFusion fix come from the peer-xdit kit
(``../shared/peer-xdit``), which measured them on 2xH200.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stadi_worker.cli.ranks import python_module, rank_log, run_ranks

WORLD = 2
_COMPILE = ("--use_torch_compile",)
# xfuser CLI flags of each 2-GPU configuration, per family xDiT runs here (the driver's ``PIPELINES``). FLUX.1 is
# guidance-distilled: no CFG parallel; its published 2-GPU figures are Ulysses and Ring with torch.compile.
CONFIGS: dict[str, dict[str, tuple[str, ...]]] = {
    "sd3": {
        "cfg": ("--use_cfg_parallel",),
        "cfg-compile": ("--use_cfg_parallel", *_COMPILE),
        "pipefusion": ("--pipefusion_parallel_degree", "2"),
        "ulysses": ("--ulysses_degree", "2"),
        "ring": ("--ring_degree", "2"),
    },
    "flux": {
        "ulysses": ("--ulysses_degree", "2"),
        "ulysses-compile": ("--ulysses_degree", "2", *_COMPILE),
        "ring": ("--ring_degree", "2"),
        "ring-compile": ("--ring_degree", "2", *_COMPILE),
        "pipefusion": ("--pipefusion_parallel_degree", "2"),
        "pipefusion-compile": ("--pipefusion_parallel_degree", "2", *_COMPILE),
    },
}
FAMILIES = tuple(CONFIGS)
# xDiT's single-GPU path (every degree 1, one rank): the check on one GPU that its pipeline of a family runs on
# stadi's weights, and the peer's own one-GPU figure (``python -m stadi_bench.peer_xdit``)
SINGLE: dict[str, tuple[str, ...]] = {"single": (), "single-compile": _COMPILE}
DRIVER = tuple(python_module("stadi_bench.xdit_driver"))


@dataclass(frozen=True)
class PeerJob:
    """What every configuration generates: stadi's job of the same run, on the same pipeline directory."""

    model_dir: Path
    family: str
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    prompt: str
    dtype: str
    runs: int
    warmup_runs: int


def parse_configs(text: str, family: str = "sd3") -> list[str]:
    """``"cfg,pipefusion"`` -> the configuration names of ``family``, checked; ``"all"`` -> every one."""
    known = CONFIGS[family]
    names = list(known) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--peer-configs: unknown {', '.join(unknown) or '(none given)'} for {family}; "
                         f"known: {', '.join(known)}")
    return names


def driver_argv(config: str, job: PeerJob, json_out: Path) -> list[str]:
    """The driver's arguments for ``config`` (xfuser's CLI plus the driver's own); ``config`` is one of the
    family's 2-GPU configurations or a ``SINGLE`` one."""
    # --warmup_steps: PipeFusion's synchronous first steps, xfuser's default and the kit's setting
    return ["--model", str(job.model_dir), "--height", str(job.height), "--width", str(job.width),
            "--num_inference_steps", str(job.steps), "--guidance_scale", str(job.guidance), "--seed", str(job.seed),
            "--warmup_steps", "1", "--bench_prompt", job.prompt, "--dtype", job.dtype,
            "--warmup_runs", str(job.warmup_runs), "--repeats", str(job.runs), "--json_out", str(json_out),
            "--family", job.family, *(SINGLE[config] if config in SINGLE else CONFIGS[job.family][config])]


def log_tail(path: Path, lines: int = 6) -> list[str]:
    """The first distinct error lines of a rank's log, then its last lines (progress bars left out)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    keep = [ln.rstrip() for ln in text.replace("\r", "\n").split("\n") if ln.strip() and "it/s]" not in ln]
    errors: list[str] = []
    for ln in keep:
        # torch.distributed's ChildFailedError/elastic summaries repeat, and hide, the rank's own error
        if re.search(r"(Error|Exception|Killed|Terminated)\b", ln) and "elastic" not in ln \
                and "ChildFailedError" not in ln and ln not in errors:
            errors.append(ln)
    return [ln[-300:] for ln in [*errors[:4], "...", *keep[-lines:]]]


def run_config(config: str, job: PeerJob, workdir: Path, env: dict[str, str], rank_env: dict[int, dict[str, str]],
               timeout_s: float, driver: tuple[str, ...] = DRIVER) -> dict[str, Any]:
    """One configuration on ``WORLD`` local ranks (one for a ``SINGLE`` one): the driver's result, or what went
    wrong."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "result.json"
    out.unlink(missing_ok=True)
    world = 1 if config in SINGLE else WORLD
    ranks = run_ranks([*driver, *driver_argv(config, job, out)], world, workdir, timeout_s, env=env,
                      rank_env=rank_env)
    logs = [rank_log(workdir, r) for r in range(world)]
    if ranks.ok and out.exists():
        entry = json.loads(out.read_text())
        entry["seconds"] = ranks.seconds
        if entry.get("latents_finite") is False:  # fast but wrong: no candidate for the best
            entry["error"] = "final latents not finite"
        return entry
    if ranks.timed_out:
        error = f"timed out after {timeout_s:g} s"
    elif any(ranks.codes):
        error = f"ranks exited with codes {ranks.codes}"
    else:
        error = "ranks exited 0 without a result"
    return {"error": error, "exit_codes": ranks.codes, "seconds": ranks.seconds,
            "log_tail": {f"rank{r}": log_tail(p) for r, p in enumerate(logs)}}


def best(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The level's entry: its fastest configuration that ran without error, and every configuration."""
    ok = {n: c["latency_ms"] for n, c in configs.items() if "error" not in c and c.get("latency_ms")}
    name = min(ok, key=lambda n: ok[n]) if ok else None
    return {"best": name, "latency_ms": ok.get(name) if name else None, "configs": configs}


def run_level(level: str, configs: list[str], job: PeerJob, workdir: Path, env: dict[str, str],
              rank_env: dict[int, dict[str, str]], timeout_s: float, driver: tuple[str, ...] = DRIVER,
              on_config: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every configuration at one heterogeneity level, one after the other; ``on_config`` gets the level's
    entry so far after each (partial results survive a kill in the middle of a level)."""
    results = {}
    for name in configs:
        where = workdir / f"peer-{level.replace('/', '-')}-{name}"
        entry = run_config(name, job, where, env, rank_env, timeout_s, driver)
        results[name] = entry
        what = entry.get("error") or f"{entry['latency_ms'] / 1e3:.3f} s"
        print(f"level {level}: xDiT {name}: {what} ({entry['seconds']} s)", file=sys.stderr, flush=True)
        if on_config is not None:
            on_config(best(results))
    return best(results)


def new_block(configs: list[str], timeout_s: float, family: str = "sd3") -> dict[str, Any]:
    """The result's ``peer`` block, before any level."""
    return {"engine": "xDiT", "package": "xfuser", "family": family, "configs": configs, "timeout_s": timeout_s,
            "version": None, "levels": {}}


def record_level(block: dict[str, Any], level: str, entry: dict[str, Any]) -> None:
    """Add a level's entry to the ``peer`` block (and the engine version its driver reported)."""
    block["levels"][level] = entry
    block["version"] = next((c["engine"] for c in entry["configs"].values() if "engine" in c), block["version"])


def merge(peers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The peer blocks of several results as one: levels united, a later run's configuration replacing an
    earlier one's unless only the earlier one succeeded, the best recomputed."""
    if not peers:
        return None
    out = {k: v for k, v in peers[0].items() if k != "levels"}
    levels: dict[str, dict[str, Any]] = {}
    for peer in peers:
        for level, entry in peer["levels"].items():
            into = levels.setdefault(level, {})
            for name, config in entry["configs"].items():
                if "error" not in config or "error" in into.get(name, {"error": None}):
                    into[name] = config
    out["levels"] = {level: best(configs) for level, configs in levels.items()}
    out["configs"] = list(dict.fromkeys(n for p in peers for n in p.get("configs", [])))
    return out


def main(argv: list[str] | None = None) -> int:
    """xDiT's single-GPU path on one GPU: every ``SINGLE`` configuration on stadi's pipeline of a family."""
    import argparse
    import os

    from stadi_worker.job.loading import resolve_source

    from stadi.api import ModelSource

    parser = argparse.ArgumentParser(prog="python -m stadi_bench.peer_xdit", description=main.__doc__)
    parser.add_argument("--family", default="flux", choices=FAMILIES)
    parser.add_argument("--source", default="random://full")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds per configuration")
    parser.add_argument("--cache-dir", default=os.environ.get("STADI_CACHE", "/tmp/stadi-cache"))
    parser.add_argument("--work", default="/tmp/stadi-peer-single")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    source = ModelSource.model_validate({"family": args.family, "source": args.source, "dtype": "float16"})
    job = PeerJob(model_dir=resolve_source(source, Path(args.cache_dir)), family=args.family, height=args.height,
                  width=args.height, steps=args.steps, guidance=args.guidance, seed=42,
                  prompt="a lighthouse on a cliff at dusk", dtype="float16", runs=args.runs, warmup_runs=1)
    report: dict[str, Any] = {"command": " ".join(["python -m stadi_bench.peer_xdit", *(argv or sys.argv[1:])]),
                              "family": args.family, "height": args.height, "steps": args.steps, "configs": {}}
    for name in SINGLE:
        report["configs"][name] = run_config(name, job, Path(args.work) / name, dict(os.environ), {}, args.timeout)
        Path(args.out).write_text(json.dumps(report, indent=1))
        entry = report["configs"][name]
        what = entry.get("error") or f"{entry['latency_ms'] / 1e3:.3f} s"
        print(f"xDiT {name}: {what} ({entry['seconds']} s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
