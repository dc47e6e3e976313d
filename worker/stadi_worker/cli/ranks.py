"""Start and supervise the local ranks of a gang with torch's elastic multiprocessing (what torchrun runs).

Every local launch goes through here: ``stadi run``'s ranks, the benchmarks' levels and peer configurations, and
the distributed tests. Each rank gets torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and a free
loopback MASTER_PORT) plus what torchrun cannot give: an environment of its own (CUDA MPS confines one rank to a
share of the SMs through a variable of that rank's process alone; rank 0 alone reports progress). Its output goes
to ``rank-N.log`` (stderr) and ``rank-N.out`` (stdout) in the gang's log directory, or to the console.

As soon as one rank fails the others are stopped (SIGTERM, SIGKILL after a grace period), and the failure
reported is the first one: the oldest error record (``record_failure``, elastic's error-file format with a
precise time), since the other ranks usually fail of its death after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing import start_processes
from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs, PContext, RunProcsResult, SignalException

STOP_GRACE_S = 5  # SIGTERM, then SIGKILL after this long
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # where elastic tells a rank to record why it failed
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # elastic takes these over while running

__all__ = ["ERROR_FILE_ENV", "Gang", "RankFailure", "RanksOutcome", "SignalException", "free_port", "python_module",
           "rank_log", "record_failure", "run_ranks"]


def free_port() -> int:
    """A TCP port free on loopback now (the rendezvous port of a local gang)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def record_failure(rank: int, message: str, error: BaseException | None = None, path: str | None = None) -> None:
    """Write why this rank fails where its launcher reads it (``path``, default ``$TORCHELASTIC_ERROR_FILE``), in
    elastic's error-file format plus the precise time and the rank; nothing without a path."""
    path = path or os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    now = time.time()
    stack = "".join(traceback.format_exception(error)) if error is not None else ""
    record = {"message": {"message": message, "extraInfo": {"py_callstack": stack, "timestamp": str(int(now))}},
              "rank": rank, "time": now}
    with contextlib.suppress(OSError):  # the launcher falls back to the exit code and the log's last line
        Path(path).write_text(json.dumps(record))


@dataclass(frozen=True)
class RankFailure:
    """The rank that failed first, and why."""

    rank: int
    message: str


@dataclass(frozen=True)
class RanksOutcome:
    """How a gang ended: exit codes per rank (negative: killed by that signal; None: stopped while running),
    whether its deadline stopped it, how long it ran, and the first failure."""

    codes: list[int | None]
    timed_out: bool
    seconds: float
    failure: RankFailure | None = None
    values: dict[int, Any] = field(default_factory=dict)  # what a function entrypoint returned, per rank

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.failure is None and all(c == 0 for c in self.codes)


def rank_log(log_dir: Path, rank: int) -> Path:
    """Where a gang logging to ``log_dir`` keeps rank ``rank``'s stderr."""
    return Path(log_dir) / f"rank-{rank}.log"


class RankLogs(LogsSpecs):
    """Per-rank files in one directory: ``rank-N.log`` (stderr), ``rank-N.out`` (stdout), ``error-N.json``; with
    ``redirect`` off the ranks write to the console and only the error records are files."""

    def __init__(self, log_dir: Path, redirect: bool = True) -> None:
        super().__init__(str(log_dir))
        self.dir, self.redirect = Path(log_dir), redirect

    @property
    def root_log_dir(self) -> str:
        return str(self.dir)

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        self.dir.mkdir(parents=True, exist_ok=True)
        ranks = range(len(envs))
        errors = {r: str(self.dir / f"error-{r}.json") for r in ranks}
        for r in ranks:
            envs[r][ERROR_FILE_ENV] = errors[r]
        console = dict.fromkeys(ranks, "")  # elastic's name for "not redirected"
        return LogsDest(
            stdouts={r: str(self.dir / f"rank-{r}.out") for r in ranks} if self.redirect else console,
            stderrs={r: str(rank_log(self.dir, r)) for r in ranks} if self.redirect else dict(console),
            error_files=errors)


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


class Gang:
    """``world`` local ranks of ``entrypoint``: a program (argv[0], with argv[1:] as every rank's arguments) or a
    Python function (called with ``args``; ``start_method`` "fork" reuses the caller's imports, as the tests do)."""

    def __init__(self, entrypoint: Sequence[str] | Callable[..., Any], world: int, log_dir: Path, *,
                 args: Sequence[Any] = (), env: Mapping[str, str] | None = None,
                 rank_env: Mapping[int, Mapping[str, str]] | None = None, redirect: bool = True,
                 start_method: str = "spawn") -> None:
        base = {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()), **(env or {})}
        envs = {r: {**base, "RANK": str(r), "LOCAL_RANK": str(r), **(rank_env or {}).get(r, {})}
                for r in range(world)}
        if callable(entrypoint):
            program: str | Callable[..., Any] = entrypoint
            argv = {r: tuple(args) for r in range(world)}
        else:
            program, argv = entrypoint[0], {r: tuple(entrypoint[1:]) for r in range(world)}
        self.world = world
        self.logs = RankLogs(log_dir, redirect)
        self._spec = (program, argv, envs, start_method)
        self._pc: PContext | None = None
        self._done: RanksOutcome | None = None
        self._handlers: dict[int, Any] = {}
        self._started = 0.0

    def __enter__(self) -> Gang:
        self.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def start(self) -> None:
        # elastic logs each signal it sends and each failure it sees: the outcome reports the first failure
        logging.getLogger("torch.distributed.elastic.multiprocessing").setLevel(logging.CRITICAL)
        program, argv, envs, start_method = self._spec
        self._handlers = {int(s): signal.getsignal(s) for s in _HANDLED}
        self._started = time.monotonic()
        self._pc = start_processes(name="stadi", entrypoint=program, args=argv, envs=envs, logs_specs=self.logs,
                                   start_method=start_method)

    def poll(self) -> RanksOutcome | None:
        """The outcome once every rank exited 0 or one failed (the others are stopped then); else None."""
        if self._done is None:
            assert self._pc is not None, "start the gang first"
            result = self._pc.wait(0)
            if result is not None:
                self._done = self._outcome(result, timed_out=False)
                self._release()
        return self._done

    def wait(self, timeout_s: float | None = None, *, period: float = 0.05,
             until: Callable[[], bool] | None = None) -> RanksOutcome:
        """Poll until the gang ends, ``timeout_s`` passes or ``until()`` holds (both stop the ranks: a timeout
        marks the outcome ``timed_out``)."""
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        while True:
            outcome = self.poll()
            if outcome is not None:
                return outcome
            if until is not None and until():
                return self.stop()
            if deadline is not None and time.monotonic() > deadline:
                return self.stop(timed_out=True)
            time.sleep(period)

    def stop(self, timed_out: bool = False) -> RanksOutcome:
        """Stop whatever still runs; the outcome as it stands."""
        if self._done is None:
            result = self._pc.wait(0) if self._pc is not None else None
            self._done = (self._outcome(result, timed_out) if result is not None
                          else RanksOutcome([None] * self.world, timed_out, self._seconds()))
            self._release()
        return self._done

    def _release(self) -> None:
        """Stop every rank still running and give the caller its signal handlers back (elastic took them)."""
        if self._pc is not None:
            self._pc.close(timeout=STOP_GRACE_S)
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)

    def _seconds(self) -> float:
        return round(time.monotonic() - self._started, 1)

    def _outcome(self, result: RunProcsResult, timed_out: bool) -> RanksOutcome:
        # a failed gang's other ranks were stopped: their codes are unknown unless elastic recorded them
        codes: list[int | None] = [None if result.failures else 0] * self.world
        records = []
        for rank, failure in result.failures.items():
            codes[rank] = failure.exitcode
            data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
            message = data.get("message")
            text = message.get("message") if isinstance(message, dict) else None  # elastic's "<NONE>": no record
            if text:
                records.append((float(data.get("time", failure.timestamp)), False, rank, str(text)))
            else:
                code = failure.exitcode
                reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                tail = _last_line(rank_log(self.logs.dir, rank)) if self.logs.redirect else ""
                # after any rank that says why, and a rank we stopped (SIGTERM) after one that died by itself
                records.append((float("inf"), code == -signal.SIGTERM, rank, f"{reason}{': ' + tail if tail else ''}"))
        first = RankFailure(*min(records)[2:]) if records else None
        return RanksOutcome(codes, timed_out, self._seconds(), first, dict(result.return_values))


def run_ranks(argv: Sequence[str], world: int, log_dir: Path, timeout_s: float | None, *,
              env: Mapping[str, str] | None = None, rank_env: Mapping[int, Mapping[str, str]] | None = None,
              redirect: bool = True) -> RanksOutcome:
    """Run program ``argv`` as ranks 0..world-1 until they end, one fails or ``timeout_s`` (if any) passes."""
    with Gang(argv, world, log_dir, env=env, rank_env=rank_env, redirect=redirect) as gang:
        return gang.wait(timeout_s)


def python_module(module: str, *args: str) -> list[str]:
    """The argv that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]
