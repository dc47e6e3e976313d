"""Flags of ``stadi bench fidelity`` and ``stadi bench speed`` (standard library only: ``stadi --help`` stays
fast)."""

from __future__ import annotations

from typing import Any

STRATEGIES_MEASURED = ("single", "patch", "cfg", "stadi", "stadi+cfg", "hybrid", "auto")
DEFAULT_PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def add_fidelity_arguments(p: Any) -> None:
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
    p.add_argument("--prompt", default="a red bicycle in the snow",
                   help="the prompt, or several separated by '|', used in turn by the cases")
    p.add_argument("--seed", type=int, default=0, help="the first case's seed; case i uses seed + i")
    p.add_argument("--cases", type=int, default=1, help="prompt and seed pairs each plan runs (figures: means)")
    p.add_argument("--grid", help="write a PNG of the first cases: serial next to each plan, band edges in red")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--plans", default="exact,patch,stadi:1-2",
                   help="comma-separated: exact, patch, cfg, hybrid, stadi, stadi:K0-K1-... (strides), FILE.json")
    p.add_argument("--cache-dir", help="model cache (default $STADI_CACHE/models)")
    p.add_argument("--json", help="write the results as JSON to this file")


def add_speed_arguments(parser: Any) -> None:
    """Flags of ``stadi bench speed``."""
    parser.add_argument("--models", default="sdxl,sd3", help="comma-separated families (random weights)")
    parser.add_argument("--size", default="full", choices=("full", "tiny"), help="random://SIZE architectures")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")
    parser.add_argument("--ranks", type=int, help="ranks (default: every visible GPU; CPU: 2)")
    parser.add_argument("--levels", default="100,50,25",
                        help="GPU: percent of the SMs (CUDA MPS) of the last rank, one level each; "
                             "50/25 confines the last two ranks to 50%% and 25%%")
    parser.add_argument("--slowdown", action="append", default=[], metavar="RANK=FACTOR",
                        help="CPU smoke runs: paced slowdown of the last rank instead of MPS (one level per item)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--warmup-steps", type=int, default=4, help="parallelism.warmupSteps of the job")
    parser.add_argument("--max-stride", type=int, default=4)
    parser.add_argument("--min-effective-steps", type=int, default=20)
    parser.add_argument("--strategies", default="all",
                        help=f"comma-separated subset of {','.join(STRATEGIES_MEASURED)} (single always runs)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile whole-frame steps (single, cfg) inside their graphs (spec.model.compile)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per strategy (median)")
    parser.add_argument("--warmup-runs", type=int, default=1, help="untimed runs per strategy first")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, help="torch threads per rank (CPU)")
    parser.add_argument("--cache-dir", help="where random pipelines are built once (default: $STADI_CACHE/models)")
    parser.add_argument("--level-timeout", type=float, default=1800.0, help="seconds per level before it is killed")
    parser.add_argument("--name", default=None, help="results name: bench/results/NAME.json (default: speed-DEVICE)")
    parser.add_argument("--out-dir", default="bench/results", help="where NAME.json and NAME.png go")
    parser.add_argument("--no-plot", action="store_true", help="no PNG (e.g. when results are merged later)")
    parser.add_argument("--peer", choices=("xdit",), help="also measure this peer engine at every level (2 GPUs)")
    parser.add_argument("--peer-family", choices=("sd3", "flux"), default="sd3",
                        help="the pipeline the peer runs (one of --models; default sd3)")
    parser.add_argument("--peer-configs", default="all",
                        help="the peer's configurations, comma-separated (default all): sd3 cfg,cfg-compile,"
                        "pipefusion,ulysses,ring; flux ulysses,ulysses-compile,ring,ring-compile,pipefusion,"
                        "pipefusion-compile")
    parser.add_argument("--peer-timeout", type=float, default=300.0,
                        help="seconds per peer configuration and level before it is killed (and recorded as such)")
    parser.add_argument("--peer-only", action="store_true",
                        help="only the peer at each level (stadi's figures from another run, joined by --merge)")


def add_train_arguments(p: Any) -> None:
    """Flags of ``stadi train`` (defaults: the committed models, trained on one H200)."""
    p.add_argument("--family", required=True, choices=("sdxl", "sd3", "flux"),
                   help="the family whose small model to train")
    p.add_argument("--out", required=True, help="checkpoint directory to write (diffusers layout, fp16 safetensors)")
    p.add_argument("--size", type=int, default=256, help="training images are SIZE x SIZE pixels (default 256)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=12000, help="steps of the denoiser and text encoders")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="the denoiser's learning rate")
    p.add_argument("--text-lr", type=float, default=3e-4, help="the text encoders' learning rate")
    p.add_argument("--bank", type=int, default=8192, help="augmented images encoded once for the denoiser's steps")
    p.add_argument("--max-seconds", type=float, help="safety stop: end each phase early rather than run longer "
                   "(the steps run are recorded in train.json)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="the denoiser's training arithmetic on a GPU (bf16 autocast or float32)")
    p.add_argument("--samples", help="also write a grid of one sample per caption into this directory")
