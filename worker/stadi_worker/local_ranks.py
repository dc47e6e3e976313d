"""Run one local process per rank with the torch.distributed variables set by hand (the benchmarks' launcher).

Per-rank environment is what torchrun cannot give: CUDA MPS confines one rank to a share of the SMs through a
variable of that rank's process alone. The ranks share the caller's process group, so a ``timeout`` around the
caller still reaches them.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RanksOutcome:
    """Exit codes per rank (negative: killed by that signal), and whether the deadline killed them."""

    codes: list[int]
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.timed_out and not any(self.codes)


def run_ranks(argv: list[str], world: int, env: dict[str, str], rank_env: dict[int, dict[str, str]],
              timeout_s: float, logs: list[Path] | None = None) -> RanksOutcome:
    """Start ``argv`` as ranks 0..world-1, wait; kill every rank as soon as one fails or ``timeout_s`` passes.

    ``env`` adds to this process's environment for every rank, ``rank_env[r]`` to rank r's alone; ``logs[r]``
    (when given) receives rank r's stdout and stderr.
    """
    from stadi_worker.launch import free_port

    base = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **env)
    sinks = [open(p, "wb") for p in logs] if logs else []  # noqa: SIM115 (closed in the finally below)
    t0 = time.monotonic()
    timed_out = False
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for r in range(world):
            out = sinks[r] if sinks else None
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if sinks else None,
                                          env=dict(base, RANK=str(r), LOCAL_RANK=str(r), **rank_env.get(r, {}))))
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            if time.monotonic() - t0 > timeout_s:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for s in sinks:
            s.close()
    return RanksOutcome([int(p.returncode) for p in procs], timed_out, round(time.monotonic() - t0, 1))
