"""The `stadi` command. The core owns `plan` and `crd`; the worker and operator packages add their
subcommands through the `stadi.commands` entry-point group, so the core never imports them."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from stadi import __version__, gpus, logs
from stadi.api import QUALITIES, STRATEGIES, Plan, load_job
from stadi.families import FAMILIES, runs_cfg
from stadi.planner import LINKS, Device, PlanRequest, plan
from stadi.planner.cost import DEFAULT_EXCHANGE, EXCHANGES
from stadi.planner.fidelity import DEFAULT_QUALITY

log = logging.getLogger(__name__)


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


def parse_gpus(text: str) -> list[Device]:
    """`H100,A100-80GB,L4:0.5` -> devices; the number after ':' is the load (0 idle, <1)."""
    devices = []
    for i, item in enumerate(part.strip() for part in text.split(",")):
        if not item:
            raise UsageError(f"--gpus: entry {i} is empty; expected PRODUCT[:LOAD], e.g. H100,L4:0.5")
        product, _, load = item.partition(":")
        devices.append(Device(product, _load(load, f"--gpus: entry {item!r}"), index=i))
    return devices


def _load(text: str, where: str) -> float:
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{where}: load {text!r} is not a number; expected 0 <= load < 1") from None
    if not 0.0 <= value < 1.0:  # also rejects nan
        raise UsageError(f"{where}: load {value} is out of range; expected 0 <= load < 1")
    return value


def read_gpus_file(path: Path) -> list[Device]:
    """A YAML/JSON list of {product, load, node, index, speed} (or of product strings)."""
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"--gpus-file: cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--gpus-file: {path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"--gpus-file: {path} is not valid YAML{where}") from None
    if not isinstance(items, list) or not items:
        raise UsageError(f"--gpus-file: {path} must hold a non-empty list of GPUs")
    return [_device(i, item) for i, item in enumerate(items)]


def _device(i: int, item: object) -> Device:
    where = f"--gpus-file: entry {i}"
    if isinstance(item, str):
        item = {"product": item}
    if not isinstance(item, dict) or not isinstance(item.get("product"), str):
        raise UsageError(f"{where} needs a 'product' string")
    unknown = set(item) - {"product", "load", "node", "index", "speed"}
    if unknown:
        raise UsageError(f"{where} has unknown keys {sorted(map(str, unknown))}; "
                         "allowed: product, load, node, index, speed")
    node, index, speed = item.get("node"), item.get("index", i), item.get("speed")
    if node is not None and not isinstance(node, str):
        raise UsageError(f"{where}: node must be a string")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise UsageError(f"{where}: index must be an integer >= 0")
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, int | float)
                              or not math.isfinite(speed) or speed <= 0):
        raise UsageError(f"{where}: speed must be a number > 0")
    return Device(item["product"], _load(str(item.get("load", "")), where), node, index, speed)


def _link(text: str | None) -> float | None:
    if text is None:
        return None
    if text in LINKS:
        return LINKS[text]
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--link: {text!r} is not {', '.join(LINKS)} or a bandwidth in GB/s > 0")
    return value


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan a job on a pool and print the plan."""
    if bool(args.gpus) == bool(args.gpus_file):
        raise UsageError("stadi plan: give exactly one of --gpus or --gpus-file")
    pool = parse_gpus(args.gpus) if args.gpus else read_gpus_file(Path(args.gpus_file))
    if args.job:
        try:
            spec = load_job(yaml.safe_load(Path(args.job).read_text())).spec
        except (OSError, yaml.YAMLError, ValueError) as error:
            raise UsageError(f"--job: {error}") from None
        request = replace(PlanRequest.from_spec(spec, _link(args.link)), exchange=args.exchange)
    else:
        p = args
        request = PlanRequest(
            family=p.model, height=p.height, width=p.width, steps=p.steps, guidance=runs_cfg(p.model, p.guidance_scale),
            strategy=p.strategy, warmup_steps=p.warmup_steps, max_stride=p.max_stride,
            min_effective_steps=min(p.min_effective_steps, p.steps), gpus_min=p.gpus_min,
            gpus_max=p.gpus_max if p.gpus_max is not None else max(len(pool), p.gpus_min),
            link_gbytes_per_s=_link(p.link), compiled=p.compile, quality=p.quality, exchange=p.exchange,
        )
    try:
        result = plan(request, pool)
    except ValueError as error:
        raise UsageError(f"stadi plan: {error}") from None
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print((format_pool(pool) + "\n\n" if args.explain else "") + format_plan(result))
    return 0


def format_pool(pool: list[Device]) -> str:
    """Where each GPU's speed comes from (``--explain``): a measured speed (a finished job's, given in the pool)
    ahead of the catalogue speed times (1 - load)."""
    lines = ["speeds of the pool (an H100 SXM is 1.0):"]
    for i, d in enumerate(pool):
        where = f"{d.node or '-'}/{d.product}#{d.index if d.index is not None else i}"
        source = ("measured by an earlier job" if d.speed is not None else
                  f"catalogue {gpus.resolve(d.product).speed:.3f} x (1 - load {d.load:.2f})")
        lines.append(f"  {where:<36} {d.effective_speed():6.3f}  {source}")
    return "\n".join(lines)


def format_plan(p: Plan) -> str:
    """A readable table of a plan and the strategies compared."""
    lines = [
        f"strategy {p.strategy}   predicted {p.predicted_seconds:.3f} s   fidelity {p.fidelity or '-'}   {p.family} "
        f"{p.latent_height}x{p.latent_width} latent   {p.steps} steps   warmup {p.warmup_steps}   "
        f"sync period {p.sync_period}",
        "",
        f"{'rank':>4}  {'gpu':<24} {'node':<12} {'speed':>6}  {'rows':<11} {'stride':>6}  {'branch':<6} "
        f"{'step ms':>8}",
    ]
    for r in p.ranks:
        lines.append(
            f"{r.rank:>4}  {r.gpu:<24} {r.node or '-':<12} {r.speed:>6.3f}  "
            f"{f'[{r.rows[0]}, {r.rows[1]})':<11} {r.stride:>6}  {r.branch:<6} {r.predicted_step_ms:>8.1f}"
        )
    for r in p.ranks:
        if r.uncond_rows is not None:
            lines.append(f"rank {r.rank} also evaluates the uncond branch's rows [{r.uncond_rows[0]}, "
                         f"{r.uncond_rows[1]}) once per window")
    if p.hybrid is not None:
        h = p.hybrid
        first = next(r for r in p.ranks if r.layers is not None and r.layers[0] == 0)
        lines += ["", f"pipeline window: {h.pipeline_steps} steps, from the step after the discrepancy's slope over "
                  f"{h.window} steps drops below {h.slope_threshold:g}, at step {h.cap_step} at the latest; rank "
                  f"{first.rank} runs units [0, {first.layers[1]}) of {h.units}, the other from {h.boundary_layer}"]
    lines += ["", "strategies compared (predicted seconds, fidelity class):"]
    for name, seconds in sorted(p.alternatives.items(), key=lambda kv: kv[1]):
        lines.append(f"  {'*' if name == p.strategy else ' '} {name:<15} {seconds:8.3f}  "
                     f"{p.alternative_fidelity.get(name, '-')}")
    if p.left_out:
        lines.append(f"left out (inclusion raised the predicted latency): {', '.join(p.left_out)}")
    return "\n".join(lines)


def cmd_crd(args: argparse.Namespace) -> int:
    """Write the CRDs generated from the API models."""
    from stadi.crd import write_crds

    for path in write_crds([Path(d) for d in args.out]):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stadi", description="Diffusion inference on mixed GPU fleets.")
    parser.add_argument("--version", action="version", version=f"stadi {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plan", help="plan a job on a pool of GPUs and print the plan")
    pool = p.add_argument_group("pool")
    pool.add_argument("--gpus", help="PRODUCT[:LOAD],... e.g. H100,A100-80GB,L4:0.5")
    pool.add_argument("--gpus-file", help="YAML/JSON list of {product, load, node, index, speed}")
    pool.add_argument("--link", help=f"{', '.join(LINKS)} or GB/s (default: from the pool)")
    p.add_argument("--job", help="take model, size, steps and parallelism from a DiffusionJob YAML")
    p.add_argument("--explain", action="store_true", help="also say where each GPU's speed comes from (a measured "
                   "speed of the pool, e.g. one the operator learned from a finished job, or the catalogue)")
    p.add_argument("--model", choices=FAMILIES, default="sdxl")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--strategy", choices=STRATEGIES, default="auto")
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--max-stride", type=int, default=4)
    p.add_argument("--min-effective-steps", type=int, default=20)
    p.add_argument("--gpus-min", type=int, default=1)
    p.add_argument("--gpus-max", type=int, default=None, help="default: the whole pool")
    p.add_argument("--compile", action="store_true",
                   help="steps compiled (a job's model.compile): they cost less")
    p.add_argument("--quality", choices=QUALITIES, default=DEFAULT_QUALITY,
                   help="the fidelity classes auto may pick (a job's parallelism.quality)")
    p.add_argument("--exchange", choices=EXCHANGES, default=DEFAULT_EXCHANGE,
                   help="the engine's band exchange to price: per-layer replays the measurements before issue 16")
    p.add_argument("--json", action="store_true", help="print the Plan as JSON")
    p.set_defaults(func=cmd_plan)

    c = sub.add_parser("crd", help="generate the CRD YAML from the API models")
    c.add_argument("--out", nargs="+", default=["manifests/crds", "charts/stadi/crds"])
    c.set_defaults(func=cmd_crd)

    for ep in entry_points(group="stadi.commands"):
        try:
            ep.load()(sub)
        except ImportError as error:  # a plane's extra is not installed: its commands are simply absent
            log.debug("commands not loaded", extra={"plugin": ep.name, "error": str(error)})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `stadi` console script."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        logs.configure(args.log_level)
        return int(args.func(args) or 0)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
