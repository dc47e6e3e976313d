"""``stadi bench speed``: latency of every strategy side by side on the local GPUs (docs/architecture.md,
"Benchmarks").

One invocation measures, per model and heterogeneity level: ``single`` (each rank alone, concurrently; rank
0 is the fastest GPU), ``patch`` (equal rows), ``cfg`` (condition split), ``stadi`` (the planner's stadi plan
at the speeds measured by this run's single-GPU steps), ``auto`` (the planner's choice at catalogue speeds,
re-planned after the warmup from measured speeds: what a cold job gets) and the ideal bound
``T_single_fastest * v_fastest / sum(v)`` from the same run's single-GPU step times.

Heterogeneity: on a GPU the last rank is confined to LEVEL percent of the SMs through CUDA MPS (an MPS
control daemon started by this harness, ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` set in that rank's
environment: no code in the engine); on the CPU (smoke tests) ``--slowdown RANK=FACTOR`` paces compute.

One process per rank and level (``python -m stadi_bench.speed_rank CONFIG.json``, launched by the worker's
one launcher of local ranks): each model loads once and every strategy reuses the loaded pipeline. Each
figure is the median of ``--runs`` runs after ``--warmup-runs`` untimed ones; latency is wall time from the
first to the last rank's return (text encoding and denoising loop, final latent gathered, no VAE decode, as
the peer measures). Fidelity: PSNR/SSIM of each strategy's decoded image against rank 0's serial image of the
same seed (VAE in fp32).

The peer (``--peer xdit``, on the SD3 or the Flux pipeline: ``--peer-family``): after stadi's ranks at each
level, every chosen xDiT 2-GPU configuration on the same pipeline directory, job and MPS setting
(``stadi_bench.peer_xdit``); its best per level goes into the result's ``peer`` block, the summary
(``stadi_vs_peer``: peer's best / stadi latency), the table and the plot.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stadi_bench.flags import STRATEGIES_MEASURED


@contextlib.contextmanager
def mps_daemon(enabled: bool, workdir: Path) -> Iterator[dict[str, str]]:
    """Start an MPS control daemon (pipe and log dirs under ``workdir``); yields the env its clients need."""
    if not enabled:
        yield {}
        return
    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        raise RuntimeError("CUDA MPS levels need nvidia-cuda-mps-control on PATH")
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(workdir / "mps_pipe"), "CUDA_MPS_LOG_DIRECTORY": str(workdir / "mps_log")}
    for d in env.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    full = dict(os.environ, **env)
    subprocess.run([exe, "-d"], env=full, check=True)
    try:
        yield env
    finally:
        subprocess.run([exe], input=b"quit\n", env=full, check=False)
        time.sleep(1.0)


def launch_level(world: int, config: dict[str, Any], workdir: Path, extra_env: dict[str, str],
                 rank_env: dict[int, dict[str, str]], timeout_s: float) -> dict[str, Any]:
    """Run ``python -m stadi_bench.speed_rank CONFIG`` on ``world`` local ranks (their output on the console);
    their report, with an ``error`` when they failed after measuring something (nothing measured:
    RuntimeError)."""
    from stadi_worker.cli.ranks import python_module, run_ranks

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"config-{config['level'].replace('/', '-')}.json"
    path.write_text(json.dumps(config))
    env = dict(extra_env)
    if config["device"] == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    out = run_ranks(python_module("stadi_bench.speed_rank", str(path)), world, workdir / f"ranks-{path.stem}",
                    timeout_s, env=env, rank_env=rank_env, redirect=False)
    report = Path(config["out"])
    if out.ok:
        return json.loads(report.read_text())
    why = f"timed out after {timeout_s:g} s" if out.timed_out else "failed"
    error = f"level {config['level']}: ranks {why} with exit codes {out.codes}"
    if not report.exists():
        raise RuntimeError(error)
    return dict(json.loads(report.read_text()), error=error)


def _versions() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "host": platform.node()}
    with contextlib.suppress(Exception):
        import diffusers

        info["diffusers"] = diffusers.__version__
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if info["nvidia_smi"]:
            info["driver"] = info["nvidia_smi"][0].split(",")[1].strip()
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20)
        info["topology"] = out.stdout.strip().splitlines()[:4]
    return info


def summarize(levels: dict[str, Any], peer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Targets of issue 5 from the per-level results (and the peer's best per level, when measured)."""
    worst = None
    reduction: dict[str, dict[str, float]] = {}
    ratio: dict[str, dict[str, float]] = {}
    homo: dict[str, float] = {}
    psnr_gap: dict[str, dict[str, float]] = {}
    for level, data in levels.items():
        for family, res in data["models"].items():
            st = res["strategies"]
            ideal = res.get("ideal_ms")
            s = st.get("stadi", {}).get("latency_ms")
            p = st.get("patch", {}).get("latency_ms")
            if s and ideal:
                r = s / ideal
                ratio.setdefault(family, {})[level] = round(r, 4)
                worst = r if worst is None else max(worst, r)
            if s and p:
                reduction.setdefault(family, {})[level] = round(1.0 - s / p, 4)
            if "psnr" in st.get("stadi", {}) and "psnr" in st.get("patch", {}):
                psnr_gap.setdefault(family, {})[level] = round(st["patch"]["psnr"] - st["stadi"]["psnr"], 3)
            if level in ("100", "1", "1.0", "homogeneous"):
                best = min((st[n]["latency_ms"] for n in ("patch", "cfg", "stadi", "auto")
                            if "latency_ms" in st.get(n, {})), default=None)
                single = st.get("single", {}).get("latency_ms")
                if best and single and s:
                    homo[family] = round(single / s, 4)
                    homo[family + "_best_strategy"] = round(single / best, 4)
    return {"worst_stadi_over_ideal": round(worst, 4) if worst is not None else None,
            "stadi_over_ideal": ratio, "stadi_vs_patch_reduction": reduction, "homogeneous_speedup": homo,
            "psnr_patch_minus_stadi_db": psnr_gap, **_versus_peer(levels, peer)}


def _versus_peer(levels: dict[str, Any], peer: dict[str, Any] | None) -> dict[str, Any]:
    """Per level the peer's best configuration, and how many times faster than it stadi and auto are."""
    best: dict[str, dict[str, Any]] = {}
    vs: dict[str, dict[str, dict[str, float]]] = {"stadi_vs_peer": {}, "auto_vs_peer": {}}
    for level, entry in (peer or {}).get("levels", {}).items():
        peer_ms = entry.get("latency_ms")
        if not peer_ms:
            continue
        best[level] = {"config": entry["best"], "latency_ms": peer_ms}
        family = peer["family"]
        st = levels.get(level, {}).get("models", {}).get(family, {}).get("strategies", {})
        for name in ("stadi", "auto"):
            ms = st.get(name, {}).get("latency_ms")
            if ms:
                vs[f"{name}_vs_peer"].setdefault(family, {})[level] = round(peer_ms / ms, 4)
    return {"peer_best": best, **vs}


def plot(result: dict[str, Any], path: Path) -> bool:
    """Latency per strategy per level (grouped bars, one panel per model), ideal bound as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = list(result["levels"])
    peer = result.get("peer")
    families = sorted({f for lv in result["levels"].values() for f in lv["models"]}
                      | ({peer["family"]} if peer else set()))
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.5), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        names = _columns(result) + (["peer"] if peer and peer["family"] == family else [])
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(levels))]
            if name == "peer":
                entries = [peer["levels"].get(lv, {}) for lv in levels]
                ys = [(e.get("latency_ms") or float("nan")) / 1e3 for e in entries]
                ax.bar(xs, ys, width, label=f"{peer['engine']} best", color="0.35")
                for x, y, e in zip(xs, ys, entries, strict=True):
                    if e.get("best"):  # which configuration was the peer's best there
                        ax.text(x, y, f" {e['best']}", rotation=90, fontsize=6, ha="center", va="bottom")
                continue
            ys = [result["levels"][lv]["models"].get(family, {}).get("strategies", {}).get(name, {})
                  .get("latency_ms", float("nan")) / 1e3 for lv in levels]
            ax.bar(xs, ys, width, label=name)
        ideal = [result["levels"][lv]["models"].get(family, {}).get("ideal_ms", float("nan")) / 1e3 for lv in levels]
        for i, y in enumerate(ideal):
            ax.hlines(y, i - 0.45, i + 0.45, colors="k", linestyles="--", label="ideal bound" if i == 0 else None)
        ax.set_xticks(range(len(levels)))
        ax.set_xticklabels([f"rank 1 at {lv}%" if result.get("slowdown_kind") == "mps" else f"level {lv}"
                            for lv in levels])
        ax.set_ylabel("latency per image (s)")
        ax.set_title(f"{family}, {result['height']}x{result['width']}, {result['steps']} steps")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _peer_job(args: Any, models: list[dict[str, Any]], world: int, cache: Path) -> Any:
    """The peer's job (None without ``--peer``): stadi's job of the peer's family, on its pipeline directory."""
    from stadi_bench import peer_xdit

    if not args.peer:
        return None
    family = args.peer_family
    doc = next((m for m in models if m["model"]["family"] == family), None)
    if doc is None:
        raise ValueError(f"--peer {args.peer} runs on the {family} pipeline (--peer-family): add it to --models")
    if world != peer_xdit.WORLD:
        raise ValueError(f"--peer {args.peer} runs xDiT's {peer_xdit.WORLD}-GPU configurations (got {world} ranks)")
    from stadi_worker.job.loading import resolve_source

    from stadi.api import ModelSource

    # the directory stadi's ranks load (built here when missing, before any rank starts)
    model_dir = resolve_source(ModelSource.model_validate(doc["model"]), cache)
    return peer_xdit.PeerJob(model_dir=model_dir, family=family, height=doc["height"], width=doc["width"],
                             steps=doc["steps"], guidance=doc["guidanceScale"], seed=doc["seed"], prompt=args.prompt,
                             dtype=args.dtype, runs=args.runs, warmup_runs=args.warmup_runs)


def run_bench(args: Any, argv: list[str] | None = None, on_level: Any = None,
              peer_driver: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every level: stadi's strategies (unless ``--peer-only``), then the peer's configurations (``--peer``).

    ``peer_driver``: the command each peer rank runs (default: ``stadi_bench.xdit_driver``).
    """
    import torch

    from stadi_bench import peer_xdit

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = args.ranks or (torch.cuda.device_count() if device == "cuda" else 2)
    if world < 2:
        raise ValueError(f"stadi bench speed needs at least 2 ranks (got {world})")
    models = []
    for family in [f.strip() for f in args.models.split(",") if f.strip()]:
        doc = {"model": {"family": family, "source": f"random://{args.size}", "dtype": args.dtype,
                         "compile": bool(args.compile)},
               "prompts": [args.prompt], "height": args.height, "width": args.width or args.height,
               "steps": args.steps, "guidanceScale": args.guidance, "seed": args.seed,
               "parallelism": {"warmupSteps": args.warmup_steps, "maxStride": args.max_stride,
                               "minEffectiveSteps": min(args.min_effective_steps, args.steps)},
               "output": {"uri": "file:///tmp/stadi-bench-speed"}}
        from stadi.api import DiffusionJobSpec

        DiffusionJobSpec.model_validate(doc)  # fail here, not in every rank
        models.append(doc)
    use_mps = device == "cuda" and not args.slowdown
    if use_mps:
        levels = [_mps_level(x) for x in args.levels.split(",") if x.strip()]
        for level in levels:
            level_slowdowns(level, world)
    else:  # CPU: "1" (homogeneous) and one level per --slowdown item's factor, on the last rank
        levels = ["1"] + [s.split("=")[1] for s in args.slowdown]
    from stadi_worker.settings import WorkerSettings

    cache = Path(args.cache_dir) if args.cache_dir else WorkerSettings().models_dir
    if args.peer_only and not args.peer:
        raise ValueError("--peer-only needs --peer")
    peer_configs = peer_xdit.parse_configs(args.peer_configs, args.peer_family) if args.peer else []
    peer_job = _peer_job(args, models, world, cache)
    strategies = _strategies(args.strategies, world)
    result: dict[str, Any] = {
        "command": "stadi bench speed " + " ".join(shlex.quote(a) for a in (argv or [])),
        "device": device, "ranks": world, "height": args.height, "width": args.width or args.height,
        "steps": args.steps, "guidance": args.guidance, "dtype": args.dtype, "size": args.size,
        "runs": args.runs, "warmup_runs": args.warmup_runs, "slowdown_kind": "mps" if use_mps else "paced",
        "compile": bool(args.compile), "strategies": strategies,
        "versions": _versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "levels": {},
        "env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_SYMM", "NVSHMEM", "STADI_"))},
    }
    if args.peer:
        result["peer"] = peer_xdit.new_block(peer_configs, args.peer_timeout, args.peer_family)
    with tempfile.TemporaryDirectory(prefix="stadi-speed-") as tmp:
        work = Path(tmp)
        need_mps = use_mps and any(set(level_slowdowns(lv, world).values()) != {"100"} for lv in levels)
        with mps_daemon(need_mps, work) as mps_env:
            for level in levels:
                t0 = time.perf_counter()
                config = {"level": level, "device": device, "models": models, "prompt": args.prompt, "seed": args.seed,
                          "cache_dir": str(cache), "warmup_runs": args.warmup_runs, "runs": args.runs,
                          "strategies": strategies, "out": str(work / f"level-{level.replace('/', '-')}.json"),
                          "threads": args.threads}
                rank_env: dict[int, dict[str, str]] = {}
                if use_mps:
                    rank_env = {r: {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": pct}
                                for r, pct in level_slowdowns(level, world).items() if pct != "100"}
                if not use_mps and level != "1":
                    config["slowdown"] = {str(world - 1): float(level)}
                if args.peer_only:
                    data = {"level": level, "models": {}}
                else:
                    data = launch_level(world, config, work, mps_env, rank_env, args.level_timeout)
                    if "error" in data:
                        print(f"{data['error']}; the strategies measured before are kept", file=sys.stderr)
                result["levels"][level] = data
                shown: dict[str, Any] = {"levels": {level: data}}
                if peer_job is not None:

                    def partial(entry: dict[str, Any], level: str = level) -> None:
                        peer_xdit.record_level(result["peer"], level, entry)
                        if on_level is not None:
                            on_level(dict(result, summary=summarize(result["levels"], result["peer"])))

                    entry = peer_xdit.run_level(level, peer_configs, peer_job, work, mps_env, rank_env,
                                                args.peer_timeout, peer_driver or peer_xdit.DRIVER, partial)
                    shown["peer"] = dict(result["peer"], levels={level: entry})
                data["seconds"] = round(time.perf_counter() - t0, 1)
                print(f"level {level}: done in {data['seconds']} s", file=sys.stderr, flush=True)
                print(format_table(shown), flush=True)
                if on_level is not None:  # partial results survive a later level's failure or timeout
                    result["summary"] = summarize(result["levels"], result.get("peer"))
                    on_level(result)
    result["summary"] = summarize(result["levels"], result.get("peer"))
    return result


def _columns(result: dict[str, Any]) -> list[str]:
    """The strategies a result measured (older results: what ``all`` measures on their ranks)."""
    return list(result.get("strategies") or _strategies("all", int(result.get("ranks", 2))))


def format_table(result: dict[str, Any]) -> str:
    """Seconds per image per level and model (``peer``: the peer's best there), then the peer's configurations."""
    peer = result.get("peer")
    columns = _columns(result)
    lines = [f"{'level':<6} {'model':<5} " + " ".join(f"{n:>9}" for n in (*columns, "ideal", "peer"))
             + "  PSNR(patch/cfg/stadi/auto)"]
    for level, data in result["levels"].items():
        for family, res in data["models"].items():
            st = res["strategies"]
            cells = [f"{st.get(n, {}).get('latency_ms', float('nan')) / 1e3:>9.3f}" for n in columns]
            peer_ms = (peer["levels"].get(level, {}).get("latency_ms") if peer and peer["family"] == family
                       else None) or float("nan")
            ps = "/".join(f"{st.get(n, {}).get('psnr', float('nan')):.1f}" for n in ("patch", "cfg", "stadi", "auto"))
            lines.append(f"{level:<6} {family:<5} " + " ".join(cells)
                         + f" {res['ideal_ms'] / 1e3:>9.3f} {peer_ms / 1e3:>9.3f}  {ps}")
    for level, entry in (peer or {}).get("levels", {}).items():
        cells = [f"{name} {c['latency_ms'] / 1e3:.3f}" + ("*" if name == entry["best"] else "")
                 if "error" not in c else f"{name} failed ({c['error']})" for name, c in entry["configs"].items()]
        lines.append(f"peer {peer['engine']} {peer['family']} level {level}: " + " | ".join(cells))
    return "\n".join(lines)


def _strategies(text: str, world: int) -> list[str]:
    """``--strategies``: a subset of STRATEGIES_MEASURED in their order; ``single`` always runs (the ideal
    bound and the fidelity reference come from it). ``all`` leaves out what cannot differ from another
    strategy on ``world`` ranks: ``stadi+cfg`` below 4 ranks (it is ``cfg``), ``hybrid`` beside 2."""
    if text == "all":
        asked = set(STRATEGIES_MEASURED) - ({"stadi+cfg"} if world < 4 else set()) - (
            {"hybrid"} if world != 2 else set())
    else:
        asked = {n.strip() for n in text.split(",") if n.strip()}
    unknown = asked - set(STRATEGIES_MEASURED)
    if unknown:
        raise ValueError(f"--strategies: unknown {', '.join(sorted(unknown))}; "
                         f"allowed: all or some of {', '.join(STRATEGIES_MEASURED)}")
    return [n for n in STRATEGIES_MEASURED if n in asked or n == "single"]


def level_slowdowns(level: str, world: int) -> dict[int, str]:
    """The ranks a level slows and by how much: ``50`` confines the last rank to 50% of the SMs (CPU: paces it
    ×50), ``50/25`` the last two ranks to 50% and 25%; rank 0 always runs at full speed (the fastest GPU)."""
    parts = level.split("/")
    if len(parts) > world - 1:
        raise ValueError(f"level {level!r} slows {len(parts)} ranks; with {world} ranks at most {world - 1}")
    return {world - len(parts) + i: p for i, p in enumerate(parts)}


def _mps_level(text: str) -> str:
    """One ``--levels`` item: percentages of the SMs, ``/``-separated for several slowed ranks."""
    pcts = [p.strip() for p in text.split("/")]
    if not all(p.isdigit() and 1 <= int(p) <= 100 for p in pcts):
        raise ValueError(f"--levels: {text.strip()!r} is not a percentage of the SMs (1-100, '/' between ranks)")
    return "/".join(str(int(p)) for p in pcts)


def command(args: Any) -> int:
    """``stadi bench speed``."""
    argv = sys.argv[sys.argv.index("speed") + 1:] if "speed" in sys.argv else []
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or f"speed-{args.device or 'local'}"
    path = out_dir / f"{name}.json"

    def partial(result: dict[str, Any]) -> None:
        path.write_text(json.dumps(dict(result, partial=True), indent=1) + "\n")

    try:
        result = run_bench(args, argv, partial)
    except (ValueError, RuntimeError) as error:
        print(f"stadi bench speed: {error}", file=sys.stderr)
        return 1
    result["plot"] = f"{name}.png" if not args.no_plot and plot(result, out_dir / f"{name}.png") else None
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}" + (f" and {out_dir / result['plot']}" if result["plot"] else ""))
    return 0


def _merge_model(models: dict[str, Any], family: str, entry: dict[str, Any]) -> None:
    """Strategies of a later run of the same model and level are added to (or replace) the earlier ones, but
    the first run's ``single`` stays: the ideal bound and speeds are computed from it."""
    if family not in models:
        models[family] = copy.deepcopy(entry)
        return
    kept = models[family]["strategies"]
    for name, figures in entry["strategies"].items():
        if name != "single" or name not in kept:
            kept[name] = copy.deepcopy(figures)


def merge(paths: list[Path], out: Path) -> dict[str, Any]:
    """One result from several runs of the same harness (e.g. one model each, a strategy re-measured, or the
    peer alone): levels, models, strategies and the peer's configurations united, the summary recomputed, the
    plot redrawn beside ``out``."""
    docs = [json.loads(p.read_text()) for p in paths]
    result = dict(docs[0])
    result["commands"] = [d["command"] for d in docs]
    measured = {n for d in docs for n in _columns(d)}
    result["strategies"] = [n for n in STRATEGIES_MEASURED if n in measured]
    result["levels"] = {}
    for d in docs:
        for level, data in d["levels"].items():
            into = result["levels"].setdefault(level, {**data, "models": {}})
            for family, entry in data["models"].items():
                _merge_model(into["models"], family, entry)
    from stadi_bench.peer_xdit import merge as merge_peer

    result.pop("peer", None)
    peer = merge_peer([d["peer"] for d in docs if d.get("peer")])
    if peer is not None:
        result["peer"] = peer
    result["summary"] = summarize(result["levels"], peer)
    result["plot"] = out.with_suffix(".png").name if plot(result, out.with_suffix(".png")) else None
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m stadi_bench.speed --merge A.json B.json ... OUT.json``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[0] != "--merge":
        print("usage: python -m stadi_bench.speed --merge A.json B.json ... OUT.json", file=sys.stderr)
        return 2
    print(json.dumps(merge([Path(a) for a in args[1:-1]], Path(args[-1]))["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
