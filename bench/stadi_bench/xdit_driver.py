"""One xDiT (``xfuser`` 0.7.0) configuration of SD3 or Flux on every rank: the peer of ``stadi bench speed --peer
xdit``.

Vendored from the peer-xdit kit (``../shared/peer-xdit/xdit_driver.py``, measured there on 2xH200), adapted to
run on stadi's own random SD3 (or Flux) pipeline directory and to be launched by ``stadi_bench.peer_xdit`` (one process
per rank, ``RANK``/``WORLD_SIZE``/``MASTER_*`` in the environment, CUDA MPS set per rank by the caller).

It follows xDiT's documented API as its ``examples/sd3_example.py`` and ``flux_example.py`` do: xFuserArgs CLI
-> ``create_config()`` -> ``xFuserStableDiffusion3Pipeline`` (``xFuserFluxPipeline``) ``.from_pretrained``. The
Flux path is written from that example and not yet run (no xfuser on the CPU machine; the two-GPU issue runs
it). Timed: the whole pipeline call with ``output_type="latent"`` (prompt encoding + denoising loop, no VAE decode,
as stadi's figures), ``--warmup_runs`` untimed calls, then ``--repeats`` timed ones, each between a barrier and
device syncs; a call's time is the maximum over ranks. Rank 0 writes the result to ``--json_out``.

    python -m stadi_bench.xdit_driver --model DIR --height 1024 --width 1024 --num_inference_steps 50 \
        --guidance_scale 5 --use_cfg_parallel --json_out /tmp/cfg.json      (on each rank)
"""

from __future__ import annotations

import importlib.metadata
import json
import statistics
import time
from pathlib import Path
from typing import Any


def fix_sd3_pipefusion_kv() -> None:
    """Work around the xfuser 0.7.0 bug that makes SD3 PipeFusion crash (from the peer-xdit kit).

    With sequence-parallel degree 1, ``xFuserJointAttnProcessor2_0`` updates the PipeFusion KV cache itself
    (image K/V) and then calls ``USP(..., attn_layer=attn)``, whose 0.7.0 version updates the same cache again
    with the joint image+text K/V: the first patch step fails with "The expanded size of the tensor (128) must
    match the existing size (3072)". xDiT's later sources call USP there without ``attn_layer``; so do we.
    """
    import xfuser.model_executor.layers.attention_processor as ap
    from xfuser.core.distributed import get_sequence_parallel_world_size

    usp = ap.USP

    def patched(*args: Any, **kwargs: Any) -> Any:
        if get_sequence_parallel_world_size() == 1:
            kwargs.pop("attn_layer", None)
        return usp(*args, **kwargs)

    ap.USP = patched


# xDiT's pipeline wrapper per family, and what each pipeline call takes beside the job (Flux: as many T5 tokens
# as stadi's FluxOps encodes, MAX_SEQUENCE_LENGTH)
PIPELINES = {"sd3": "xFuserStableDiffusion3Pipeline", "flux": "xFuserFluxPipeline"}
CALL_KWARGS: dict[str, dict[str, Any]] = {"sd3": {}, "flux": {"max_sequence_length": 512}}


def _parse_args(argv: list[str] | None) -> Any:
    from xfuser import xFuserArgs
    from xfuser.config import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="xDiT SD3 latency driver (stadi bench speed --peer xdit)")
    xFuserArgs.add_cli_args(parser)
    parser.add_argument("--json_out", required=True, help="where rank 0 writes the result")
    parser.add_argument("--family", default="sd3", choices=tuple(PIPELINES), help="the pipeline's family")
    parser.add_argument("--bench_prompt", default="a lighthouse on a cliff at dusk, oil painting")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--warmup_runs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch
    import torch.distributed as dist
    import xfuser
    from xfuser import xFuserArgs
    from xfuser.core.distributed import get_runtime_state, get_world_group

    args = _parse_args(argv)
    kv_fix = args.family == "sd3" and args.pipefusion_parallel_degree > 1
    if kv_fix:
        fix_sd3_pipefusion_kv()
    engine_config, input_config = xFuserArgs.from_cli_args(args).create_config()
    group = get_world_group()
    dev = torch.device(f"cuda:{group.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, args.dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    model = Path(engine_config.model_config.model)
    # stadi's random SD3 is saved without T5 (models/sd3.py): the pipeline then feeds zeros for its 256 tokens
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if args.family == "sd3" and not (
        model / "text_encoder_3").exists() else {}
    t = time.perf_counter()
    pipe = getattr(xfuser, PIPELINES[args.family]).from_pretrained(
        pretrained_model_name_or_path=str(model), engine_config=engine_config, dtype=dtype, **no_t5).to(dev)
    load_s = time.perf_counter() - t

    def timed() -> tuple[float, Any]:
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        out = pipe(height=input_config.height, width=input_config.width, prompt=args.bench_prompt,
                   num_inference_steps=input_config.num_inference_steps, output_type="latent",
                   guidance_scale=input_config.guidance_scale, **CALL_KWARGS[args.family],
                   generator=torch.Generator(device=dev.type).manual_seed(input_config.seed))
        sync()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=dev)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        return float(dt.item()) * 1e3, out

    warm = [timed()[0] for _ in range(args.warmup_runs)]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    runs = [timed() for _ in range(args.repeats)]
    times = [r[0] for r in runs]
    # only the ranks that hold the final latents return them (e.g. PipeFusion's last stage): 2 = none here
    latents = getattr(runs[-1][1], "images", None)
    finite = torch.tensor([int(bool(torch.isfinite(latents).all())) if isinstance(latents, torch.Tensor) else 2],
                          device=dev)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    from xfuser.model_executor.layers.attention_processor import xFuserAttentionBaseWrapper

    wrapped = any(isinstance(m, xFuserAttentionBaseWrapper) for m in pipe.module.transformer.modules())
    pc = engine_config.parallel_config
    result = {
        "engine": "xDiT xfuser " + importlib.metadata.version("xfuser"), "family": args.family,
        "world_size": group.world_size,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "parallel": {"dp": pc.dp_degree, "cfg": pc.cfg_degree, "ulysses": pc.ulysses_degree, "ring": pc.ring_degree,
                     "pipefusion": pc.pp_degree, "num_pipeline_patch": pc.pp_config.num_pipeline_patch},
        # xfuser's attention backend only runs where it wraps the attention (SP, PipeFusion); CFG parallel alone
        # keeps diffusers' processor (torch's SDPA picks the kernel)
        "attention_backend": get_runtime_state().attention_backend.name if wrapped else "diffusers F.sdpa",
        "torch_compile": bool(engine_config.runtime_config.use_torch_compile), "pipefusion_kv_fix": kv_fix,
        "height": input_config.height, "width": input_config.width, "steps": input_config.num_inference_steps,
        "guidance_scale": input_config.guidance_scale, "dtype": args.dtype, "load_s": round(load_s, 2),
        "warmup_ms": [round(x, 3) for x in warm], "latency_runs_ms": [round(x, 3) for x in times],
        "latency_ms": round(statistics.median(times), 3),
        "latents_finite": None if int(finite.item()) == 2 else bool(finite.item()),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
        "versions": {"torch": torch.__version__, "diffusers": importlib.metadata.version("diffusers")},
    }
    if group.rank == 0:
        Path(args.json_out).write_text(json.dumps(result))
    dist.barrier()
    get_runtime_state().destroy_distributed_env()


if __name__ == "__main__":
    main()
