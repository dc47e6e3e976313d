"""Flags of ``stadi worker`` and ``stadi run`` (standard library only, so that ``stadi --help`` stays fast)."""

from __future__ import annotations

import argparse

from stadi.api import STRATEGIES


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``stadi worker``; each overrides its ``STADI_*`` setting."""
    parser.add_argument("--plan", help="plan JSON file (default: env STADI_PLAN, then /etc/stadi/plan.json)")
    parser.add_argument("--job", help="DiffusionJob YAML/JSON (default: env STADI_JOB, then /etc/stadi/job.yaml)")
    parser.add_argument("--output", help="override the output URI (default: env STADI_OUTPUT, then the job's)")
    parser.add_argument("--endpoint", help="override the S3 endpoint URL (default: env STADI_ENDPOINT)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: env STADI_DEVICE, else cuda if any")
    parser.add_argument("--exact", action="store_true", default=None,
                        help="synchronous exchange at every step (exact, slower); default: env STADI_EXACT")
    parser.add_argument("--progress", help="rank 0's progress as JSON lines: fd:N, FILE or - (stdout); "
                        "default: env STADI_PROGRESS")


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """Flags of ``stadi run``."""
    run.add_argument("job", help="DiffusionJob YAML (the same file kubectl apply takes)")
    run.add_argument("--ranks", type=int, help="CPU: number of Gloo ranks (default 2); CUDA: use the first N GPUs")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")
    run.add_argument("--output", help="DIR, file:///dir or s3://bucket/prefix (default: the job's spec.output.uri)")
    run.add_argument("--endpoint", help="S3 endpoint URL, e.g. http://127.0.0.1:9000 (default: the job's)")
    run.add_argument("--credentials-dir", help="directory holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                     "files (default: the environment)")
    run.add_argument("--strategy", choices=list(STRATEGIES), help="override spec.parallelism.strategy")
    run.add_argument("--exact", action="store_true", help="synchronous exchange at every step (exact, slower)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--verbose", action="store_true", help="show the ranks' own output")
    run.add_argument("--slowdown", action="append", metavar="RANK=FACTOR", default=[],
                     help="FOR TESTS AND BENCHMARKS ONLY: emulate a FACTOR times slower device on RANK "
                     "(repeatable; CPU: paced compute, GPU: a CUDA green context with 1/FACTOR of the SMs); "
                     "the ranks get it as env STADI_SLOWDOWN=\"1=3.0,2=1.5\"")
