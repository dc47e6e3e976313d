"""Flags of ``stadi bench fidelity`` (kept apart from the harness so ``stadi --help`` imports no torch)."""

from __future__ import annotations

from typing import Any


def add_arguments(p: Any) -> None:
    """Flags of ``stadi bench fidelity``."""
    p.add_argument("--family", default="sdxl", help="model family (default sdxl)")
    p.add_argument("--source", default="random://tiny", help="s3://, file:// or random://tiny (default)")
    p.add_argument("--dtype", default="float32", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=None, help="default: the height")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="synchronous warmup steps (default 2)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--scheduler", default="default", choices=("default", "ddim", "euler", "dpmpp-2m", "flow-euler"))
    p.add_argument("--prompt", default="a red bicycle in the snow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--plans", default="exact,patch,stadi:1-2",
                   help="comma-separated: exact, patch, cfg, stadi, stadi:K0-K1-... (strides), FILE.json")
    p.add_argument("--cache-dir", help="model cache (default $STADI_CACHE/models)")
    p.add_argument("--json", help="write the results as JSON to this file")
