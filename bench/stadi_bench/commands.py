"""``stadi bench`` (fidelity and speed of parallel plans) and ``stadi train`` (the built-in small models),
registered through the ``stadi.commands`` entry-point group by the ``bench`` extra; heavy imports happen only
when a command runs."""

from __future__ import annotations

import argparse
from typing import Any

from stadi_bench.flags import add_fidelity_arguments, add_speed_arguments, add_train_arguments


def _fidelity(args: argparse.Namespace) -> int:
    from stadi_bench.fidelity import command

    return command(args)


def _speed(args: argparse.Namespace) -> int:
    from stadi_bench.speed import command

    return command(args)


def _train(args: argparse.Namespace) -> int:
    from stadi_bench.train.run import command

    return command(args)


def register(subparsers: Any) -> None:
    """Add ``bench fidelity``, ``bench speed`` and ``train`` to the ``stadi`` command."""
    bench = subparsers.add_parser("bench", help="worker benchmarks (fidelity and speed of parallel plans)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    fidelity = bench_sub.add_parser(
        "fidelity", help="PSNR/SSIM of parallel plans against the serial run of the same seed",
        description="Run the serial reference and each plan on N local ranks; compare the decoded images "
        "(PSNR, SSIM with an 11x11 gaussian window, sigma 1.5). Prints a table; --json writes the results.")
    add_fidelity_arguments(fidelity)
    fidelity.set_defaults(func=_fidelity)

    speed = bench_sub.add_parser(
        "speed", help="latency of single, patch, cfg, stadi, auto and the ideal bound on the local GPUs",
        description="Every strategy side by side on the local GPUs (docs/architecture.md, \"Benchmarks\"), the "
        "last rank confined to each --levels percent of the SMs through CUDA MPS (CPU: --slowdown pacing); "
        "random-weight models; median of --runs after --warmup-runs; PSNR vs serial. Writes OUT_DIR/NAME.json "
        "(+ NAME.png).")
    add_speed_arguments(speed)
    speed.set_defaults(func=_speed)

    train = subparsers.add_parser(
        "train", help="train a small text-to-image model of a family from scratch (the built-in models)",
        description="Train the small VAE, text encoders and denoiser of a family on the sample images of "
        "scikit-image and scikit-learn, seeded; write a diffusers checkpoint (fp16 safetensors) and train.json.")
    add_train_arguments(train)
    train.set_defaults(func=_train)
