"""The worker's subcommands of ``stadi``: ``run`` (a job on this machine) and ``worker`` (one rank).

Loaded by ``stadi.cli`` through the ``stadi.commands`` entry-point group; heavy imports (torch, boto3)
happen only when a command runs, so ``stadi --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from stadi.api import STRATEGIES


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``stadi worker`` (and of ``python -m stadi_worker.launch``); each has an env fallback."""
    parser.add_argument("--plan", help="plan JSON file (default: env STADI_PLAN, then /etc/stadi/plan.json)")
    parser.add_argument("--job", help="DiffusionJob YAML/JSON (default: env STADI_JOB, then /etc/stadi/job.yaml)")
    parser.add_argument("--output", help="override the output URI (default: env STADI_OUTPUT, then the job's)")
    parser.add_argument("--endpoint", help="override the S3 endpoint URL (default: env STADI_ENDPOINT)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: env STADI_DEVICE, else cuda if any")
    parser.add_argument("--exact", action="store_true",
                        help="synchronous exchange at every step (exact, slower); default: env STADI_EXACT")
    parser.add_argument("--progress", help="rank 0's progress as JSON lines: fd:N, FILE or - (stdout); "
                        "default: env STADI_PROGRESS")


def _run(args: argparse.Namespace) -> int:
    from stadi_worker.launch import run_command

    return run_command(args)


def _worker(args: argparse.Namespace) -> int:
    from stadi_worker.launch import worker_command

    return worker_command(args)


def _fidelity(args: argparse.Namespace) -> int:
    from stadi_worker.fidelity import command

    return command(args)


def _speed(args: argparse.Namespace) -> int:
    from stadi_worker.bench_speed import command

    return command(args)


def register(subparsers: Any) -> None:
    """Add ``run``, ``worker`` and ``bench fidelity`` to the ``stadi`` command."""
    run = subparsers.add_parser(
        "run", help="run a DiffusionJob on this machine (each GPU a rank, or N CPU ranks)",
        description="Plan a DiffusionJob for the local devices, run its ranks, write the images and "
        "manifest.json, and print where they are.",
    )
    run.add_argument("job", help="DiffusionJob YAML (the same file kubectl apply takes)")
    run.add_argument("--ranks", type=int, help="CPU: number of Gloo ranks (default 2); CUDA: use the first N GPUs")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")
    run.add_argument("--output", help="DIR, file:///dir or s3://bucket/prefix (default: the job's spec.output.uri)")
    run.add_argument("--endpoint", help="S3 endpoint URL, e.g. http://127.0.0.1:9000 (default: the job's)")
    run.add_argument("--credentials-dir", help="directory holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                     "files (default: the environment)")
    run.add_argument("--strategy", choices=[s for s in STRATEGIES], help="override spec.parallelism.strategy")
    run.add_argument("--exact", action="store_true", help="synchronous exchange at every step (exact, slower)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--verbose", action="store_true", help="show the ranks' own output")
    run.add_argument("--slowdown", action="append", metavar="RANK=FACTOR", default=[],
                     help="FOR TESTS AND BENCHMARKS ONLY: emulate a FACTOR times slower device on RANK "
                     "(repeatable; CPU: paced compute, GPU: a CUDA green context with 1/FACTOR of the SMs); "
                     "the ranks get it as env STADI_SLOWDOWN=\"1=3.0,2=1.5\"")
    run.set_defaults(func=_run)

    worker = subparsers.add_parser(
        "worker", help="run one rank of a DiffusionJob (used by Kubernetes pods and by stadi run)",
        description="One rank: rendezvous from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, plan and "
        "job from flags, env or the mounted ConfigMap.",
    )
    add_worker_arguments(worker)
    worker.set_defaults(func=_worker)

    bench = subparsers.add_parser("bench", help="worker benchmarks (fidelity and speed of parallel plans)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    fidelity = bench_sub.add_parser(
        "fidelity", help="PSNR/SSIM of parallel plans against the serial run of the same seed",
        description="Run the serial reference and each plan on N local ranks; compare the decoded images "
        "(PSNR, SSIM with an 11x11 gaussian window, sigma 1.5). Prints a table; --json writes the results.")
    from stadi_worker.fidelity_args import add_arguments

    add_arguments(fidelity)
    fidelity.set_defaults(func=_fidelity)

    speed = bench_sub.add_parser(
        "speed", help="latency of single, patch, cfg, stadi, auto and the ideal bound on the local GPUs",
        description="DESIGN section 8: every strategy side by side on the local GPUs, the last rank confined to "
        "each --levels percent of the SMs through CUDA MPS (CPU: --slowdown pacing); random-weight models; "
        "median of --runs after --warmup-runs; PSNR vs serial. Writes OUT_DIR/NAME.json (+ NAME.png).")
    from stadi_worker.bench_speed import add_arguments as add_speed_arguments

    add_speed_arguments(speed)
    speed.set_defaults(func=_speed)
