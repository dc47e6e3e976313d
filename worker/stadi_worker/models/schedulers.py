"""The sampler of a job: a fresh diffusers scheduler built from the pipeline's own scheduler config."""

from __future__ import annotations

from typing import Any

from stadi.families import profile
from stadi_worker.models.base import ModelOps


def make_scheduler(ops: ModelOps, name: str) -> Any:
    """A fresh scheduler for ``name`` (ddim, euler, dpmpp-2m, flow-euler, default: the family's usual one);
    ValueError when it does not fit the family's training (flow matching or not)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    config = ops.pipe.scheduler.config
    flow = ops.flow_matching
    if name == "default":
        name = profile(ops.family).default_scheduler
        if name == "flow-euler" and not flow:
            name = "euler"
    if flow != (name == "flow-euler"):
        raise ValueError(
            f"scheduler {name!r} does not fit family {ops.family!r}: "
            + ("it is a flow-matching model, use flow-euler" if flow else "flow-euler is for flow-matching models")
        )
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp-2m": DPMSolverMultistepScheduler,
           "flow-euler": FlowMatchEulerDiscreteScheduler}[name]
    if isinstance(ops.pipe.scheduler, cls):
        return cls.from_config(config)
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpmpp-2m" else {}
    return cls.from_config(config, **extra)
