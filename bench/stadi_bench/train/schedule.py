"""What the training loops share: the optimizer with its warmup and cosine decay, the exponential moving average
of the weights, one update step, and mixed precision on a GPU."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def optimizer(groups: list[dict[str, object]], steps: int, warmup: int = 200) -> tuple[torch.optim.Optimizer, object]:
    """AdamW over ``groups`` (each with its ``lr``), warmed up linearly, then cosine down to a tenth."""
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def descend(loss: torch.Tensor, params: Iterable[torch.nn.Parameter], opt: torch.optim.Optimizer, sched: Any,
            ema: Ema) -> None:
    """One update: backward, gradients clipped to norm 1, the optimizer's and the schedule's step, the average."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    ema.update()


class Ema:
    """An exponential moving average of parameters (the weights a trained model ships with)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Put the averaged weights into the parameters."""
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s.to(p.dtype))


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "bf16") -> Iterator[None]:
    """bfloat16 autocast on a GPU (``precision`` "bf16"); plain float32 on the CPU or with "fp32"."""
    if device.type == "cuda" and precision == "bf16":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


class Deadline:
    """A safety stop: training steps end early, with a warning and the steps done recorded, rather than let a
    run outlast its machine (``seconds`` None: no deadline)."""

    def __init__(self, seconds: float | None) -> None:
        import time

        self._clock = time.monotonic
        self._end = None if seconds is None else self._clock() + seconds

    def passed(self) -> bool:
        return self._end is not None and self._clock() > self._end
