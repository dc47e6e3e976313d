"""Start ranks and run them: ``stadi worker`` (one rank) and ``stadi run`` (a local gang of ranks).

``stadi worker`` is the per-rank entry of Kubernetes pods and of ``stadi run``. It reads

* the plan from ``--plan FILE``, env ``STADI_PLAN`` (a file path, or the JSON itself) or the mounted
  ConfigMap ``$STADI_CONFIG_DIR/plan.json`` (default ``/etc/stadi``);
* the job (a DiffusionJob document, YAML or JSON) from ``--job FILE``, env ``STADI_JOB`` or
  ``$STADI_CONFIG_DIR/job.yaml``/``job.json``;
* the rendezvous from the torchrun variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
* overrides from env ``STADI_JOB_NAME`` (when the job document has no name), ``STADI_OUTPUT`` (output
  URI), ``STADI_ENDPOINT`` (S3 endpoint), ``STADI_DEVICE``,
  ``STADI_EXACT=1``, ``STADI_CREDENTIALS_DIR`` (mounted Secret with the S3 keys), ``STADI_SLOWDOWN``
  (``"1=3.0,2=1.5"``: emulated slower ranks, for tests and benchmarks only);
* where to report: ``STADI_PROGRESS`` (``fd:N``, a file, or ``-`` for stdout: JSON lines of progress
  events from rank 0) and ``STADI_ERROR_FILE`` (a JSON record of the exception that ended the rank).

``stadi run`` plans the job for the local devices, checks the output, writes the plan and job to a run
directory, starts one ``python -m stadi_worker.launch`` per rank, draws a progress bar from rank 0's events,
and stops every rank as soon as one fails, reporting the rank that failed first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from stadi.api import DiffusionJob, Plan, load_job
from stadi.families import not_runnable
from stadi_worker.job_runner import ProgressEvent
from stadi_worker.storage import StorageError, local_path, open_store

log = logging.getLogger(__name__)

CONFIG_DIR_ENV = "STADI_CONFIG_DIR"
DEFAULT_CONFIG_DIR = Path("/etc/stadi")
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
STRAGGLER_GRACE_S = 120.0  # after rank 0 finished, how long the others may take to exit


class WorkerError(RuntimeError):
    """Bad worker input (plan, job, environment): reported as one line."""


# --- reading the job and the plan -----------------------------------------------------------------------


def _read_text_or_inline(value: str, what: str) -> str:
    if value.lstrip().startswith("{"):
        return value  # inline JSON (e.g. from a ConfigMap key exposed as an env var)
    try:
        return Path(value).read_text()
    except OSError as error:
        raise WorkerError(f"cannot read {what} {value}: {error.strerror or error}") from None


def read_job(value: str) -> DiffusionJob:
    """A DiffusionJob from a YAML/JSON file path or inline JSON; a bare spec is accepted too."""
    text = _read_text_or_inline(value, "job")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise WorkerError(f"job {value} is not YAML/JSON: {error}") from None
    if not isinstance(data, dict):
        raise WorkerError(f"job {value} must be a DiffusionJob document (a mapping)")
    if "spec" not in data and "model" in data:
        data = {"spec": data}
    try:
        return load_job(data)
    except ValueError as error:
        raise WorkerError(str(error)) from None


def read_plan(value: str) -> Plan:
    """A Plan from a JSON file path or inline JSON."""
    text = _read_text_or_inline(value, "plan")
    try:
        return Plan.model_validate_json(text)
    except ValueError as error:
        first = str(error).splitlines()
        raise WorkerError(f"plan {value} is not a valid Plan: {' '.join(first[:3])}") from None


def _config_file(*names: str) -> str | None:
    base = Path(os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR)
    for name in names:
        if (base / name).is_file():
            return str(base / name)
    return None


def resolve_inputs(plan: str | None, job: str | None) -> tuple[DiffusionJob, Plan]:
    """The job and plan from flags, then env, then the mounted ConfigMap."""
    plan_src = plan or os.environ.get("STADI_PLAN") or _config_file("plan.json")
    job_src = job or os.environ.get("STADI_JOB") or _config_file("job.yaml", "job.json")
    if not plan_src:
        raise WorkerError("no plan: pass --plan FILE, set STADI_PLAN, or mount plan.json in /etc/stadi")
    if not job_src:
        raise WorkerError("no job: pass --job FILE, set STADI_JOB, or mount job.yaml in /etc/stadi")
    return read_job(job_src), read_plan(plan_src)


def apply_output_overrides(job: DiffusionJob, output: str | None, endpoint: str | None) -> DiffusionJob:
    """The job with its output URI/endpoint replaced; a plain directory becomes ``file://``."""
    spec = job.spec.model_copy(deep=True)
    try:
        if output:
            path = local_path(output)
            spec.output.uri = path.resolve().as_uri() if path is not None else output
        if endpoint:
            spec.output.endpoint = endpoint
    except (ValueError, StorageError) as error:
        raise WorkerError(f"--output/--endpoint: {error}") from None
    return job.model_copy(update={"spec": spec})


# --- progress -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def progress_sink(target: str | None) -> Iterator[Callable[[ProgressEvent], None] | None]:
    """A callable writing JSON lines to ``fd:N``, ``-`` (stdout) or a file; None without a target."""
    if not target:
        yield None
        return
    stream: IO[str]
    if target == "-":
        stream, close = sys.stdout, False
    elif target.startswith("fd:"):
        stream, close = os.fdopen(int(target[3:]), "w", buffering=1), True
    else:
        stream, close = open(target, "a", buffering=1), True  # noqa: SIM115 - closed below

    def emit(event: ProgressEvent) -> None:
        stream.write(event.to_json() + "\n")
        stream.flush()

    try:
        yield emit
    finally:
        if close:
            with contextlib.suppress(OSError):
                stream.close()


# --- one rank -------------------------------------------------------------------------------------------


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_error_file(rank: int, error: BaseException) -> None:
    path = os.environ.get("STADI_ERROR_FILE")
    if not path:
        return
    record = {
        "rank": rank,
        "time": time.time(),
        "type": type(error).__name__,
        "message": one_line(error),
        "traceback": "".join(traceback.format_exception(error)),
    }
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(record))


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (stdlib-style), without the traceback."""
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    if isinstance(error, WorkerError | StorageError):
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def run_worker(
    plan: str | None = None,
    job: str | None = None,
    *,
    output: str | None = None,
    endpoint: str | None = None,
    device: str | None = None,
    exact: bool | None = None,
    progress: str | None = None,
) -> int:
    """One rank: set up the process group, check the plan, run the job. Returns the exit code."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        dj, the_plan = resolve_inputs(plan, job)
        dj = apply_output_overrides(
            dj, output or os.environ.get("STADI_OUTPUT"), endpoint or os.environ.get("STADI_ENDPOINT")
        )
        spec = dj.spec
        device = device or os.environ.get("STADI_DEVICE") or _default_device()
        exact = exact if exact is not None else os.environ.get("STADI_EXACT", "") in ("1", "true", "yes")

        from stadi_worker import runtime, status_reporter
        from stadi_worker.job_runner import run_job

        ctx = runtime.init_from_env(device)
        rank = ctx.rank
        runtime.check_plan(the_plan, spec, ctx)
        store = None
        if rank == 0:
            # Only rank 0 writes; the other ranks need no credentials.
            store = open_store(spec.output.uri, spec.output.endpoint)
        log.info("rank started", extra={"rank": rank, "world_size": ctx.world_size, "device": str(ctx.device)})
        with (progress_sink(progress or os.environ.get("STADI_PROGRESS") if rank == 0 else None) as emit,
              status_reporter.reporting(enabled=rank == 0) as reporter):
            name = dj.metadata.name or os.environ.get("STADI_JOB_NAME") or "job"
            # Rank 0's events also go to the job's status (best-effort, throttled, never raises).
            manifest = run_job(spec, the_plan, ctx, store, status_reporter.compose(emit, reporter), job_name=name,
                               exact=exact)
            if manifest is not None and reporter is not None:
                reporter.finish(manifest)  # every rank's step times into status.measured
        if manifest is not None:
            log.info("job done", extra={"output": manifest.output, "images": len(manifest.images)})
        with contextlib.suppress(Exception):  # the job is done and written: a failed goodbye changes nothing
            runtime.shutdown(ctx)
        return 0
    except Exception as error:  # the rank's last word: one line on stderr, the details in the error file
        _write_error_file(rank, error)
        log.debug("rank failed", exc_info=True)
        print(f"stadi worker rank {rank}: {one_line(error)}", file=sys.stderr, flush=True)
        return 1


def worker_command(args: argparse.Namespace) -> int:
    """``stadi worker``."""
    return run_worker(args.plan, args.job, output=args.output, endpoint=args.endpoint, device=args.device,
                      exact=True if args.exact else None, progress=args.progress)


# --- a local gang ---------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on loopback now (the rendezvous port of a local run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_pool(device: str, ranks: int | None) -> tuple[list[Any], float | None]:
    """The planner's pool for this machine, and the link bandwidth to assume (None: the planner decides).

    Each visible CUDA GPU is a device; on CPU, ``ranks`` Gloo ranks of equal speed (the catalogue knows no
    CPU; any equal speed gives the same split).
    """
    from stadi.planner import LINKS, Device

    host = socket.gethostname()
    if device == "cpu":
        n = ranks if ranks is not None else 2
        return [Device("CPU", node=host, index=i, speed=1.0) for i in range(n)], LINKS["pcie"]
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise WorkerError("--device cuda: no CUDA GPU is visible; use --device cpu")
    n = min(ranks, count) if ranks is not None else count
    if ranks is not None and ranks > count:
        raise WorkerError(f"--ranks {ranks}: only {count} CUDA GPU(s) visible")
    return [Device(torch.cuda.get_device_name(i), node=host, index=i) for i in range(n)], None


@dataclass
class _Rank:
    rank: int
    proc: subprocess.Popen[bytes]
    error_file: Path
    log_file: Path


def _kill(ranks: Sequence[_Rank]) -> None:
    """SIGTERM every live rank's process group, SIGKILL what is left after a grace period."""
    live = [r for r in ranks if r.proc.poll() is None]
    for r in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(r.proc.pid, signal.SIGTERM)  # its own session: our child and its children only
    deadline = time.monotonic() + KILL_GRACE_S
    for r in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for r in live:
        if r.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(r.proc.pid, signal.SIGKILL)
            r.proc.wait()


def _failure(ranks: Sequence[_Rank]) -> tuple[int, str]:
    """The rank that failed first and its message (other ranks usually fail after it, of its death)."""
    records = []
    for r in ranks:
        rc = r.proc.returncode
        if rc in (None, 0):
            continue
        try:
            rec = json.loads(r.error_file.read_text())
            records.append((rec["time"], r.rank, rec["message"]))
        except (OSError, ValueError, KeyError):
            tail = _tail(r.log_file)
            reason = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
            records.append((float("inf"), r.rank, f"{reason}{': ' + tail if tail else ''}"))
    if not records:
        return -1, "unknown failure"
    _, rank, message = min(records)
    return rank, message


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return ""


class _ProgressBar:
    """A tqdm bar over the steps this run generates, fed by rank 0's events (read on a thread)."""

    def __init__(self, stream: IO[str], enabled: bool | None) -> None:
        self._stream = stream
        self._enabled = enabled
        self.last: ProgressEvent | None = None
        self.images: list[str] = []
        self._thread = threading.Thread(target=self._read, name="stadi-progress", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        from tqdm import tqdm

        bar = None
        try:
            for line in self._stream:
                try:
                    event = ProgressEvent.from_json(line)
                except (ValueError, TypeError):
                    continue
                self.last = event
                if event.kind == "start":
                    todo = event.images_total - event.images_skipped
                    # disable=None: a bar on a terminal, nothing when stderr is a pipe or a file
                    bar = tqdm(total=todo * event.steps, unit="step", disable=self._enabled is False
                               if self._enabled is not None else None, dynamic_ncols=True,
                               desc=f"images {event.images_done}/{event.images_total}")
                    continue
                if bar is None:
                    continue
                if event.kind == "image" and event.uri:
                    self.images.append(event.uri)
                done_images = event.images_done - event.images_skipped
                if event.kind in ("step", "image"):
                    position = done_images * event.steps + (event.step if event.kind == "step" else 0)
                    bar.update(max(0, position - bar.n))
                    bar.set_description(f"images {event.images_done}/{event.images_total}", refresh=False)
        finally:
            if bar is not None:
                bar.close()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: a rank gets SIGKILL when the launcher dies, even by SIGKILL, so no rank outlives `stadi run`.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM to the launcher stops the ranks the same way Ctrl-C does


def run_local(
    job: DiffusionJob,
    *,
    device: str,
    ranks: int | None = None,
    strategy: str | None = None,
    exact: bool = False,
    credentials_dir: Path | None = None,
    progress_bar: bool | None = None,
    verbose: bool = False,
    log_level: str = "WARNING",
    timeout_s: float | None = None,
    out: IO[str] | None = None,
    slowdown: Sequence[str] = (),
) -> int:
    """Plan ``job`` for this machine, run its ranks as local processes, report where the images are.

    ``slowdown`` (``RANK=FACTOR`` items; tests and benchmarks only) emulates slower devices: it becomes
    env STADI_SLOWDOWN of every rank."""
    from stadi.planner import plan_job

    out = out or sys.stdout
    spec = job.spec
    if strategy:
        spec = spec.model_copy(update={"parallelism": spec.parallelism.model_copy(update={"strategy": strategy})})
        try:
            spec = type(spec).model_validate(spec.model_dump())
        except ValueError as error:
            raise WorkerError(f"--strategy {strategy}: {error}") from None
        job = job.model_copy(update={"spec": spec})
    slow_text = ",".join(slowdown)
    if slow_text:
        from stadi_worker.emulate import parse_slowdown

        try:
            parse_slowdown(slow_text)
        except ValueError as error:
            raise WorkerError(f"--slowdown: {error}") from None
    pool, link = local_pool(device, ranks)
    try:
        plan = plan_job(spec, pool, link)
    except ValueError as error:
        raise WorkerError(f"cannot plan the job on {len(pool)} {device} rank(s): {error}") from None
    world = plan.world_size
    log.info("planned", extra={"strategy": plan.strategy, "ranks": world, "pool": len(pool)})
    # Fail on a bad output before any rank starts (and before any model is loaded).
    store = open_store(spec.output.uri, spec.output.endpoint, credentials_dir)

    run_dir = Path(tempfile.mkdtemp(prefix="stadi-run-"))
    (run_dir / "plan.json").write_text(plan.model_dump_json(indent=2))
    (run_dir / "job.json").write_text(json.dumps(job.model_dump(by_alias=True, mode="json", exclude_none=True)))
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env.update(
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()), STADI_PLAN=str(run_dir / "plan.json"), STADI_JOB=str(run_dir / "job.json"),
        STADI_DEVICE=device, STADI_EXACT="1" if exact else "0", STADI_LOG_LEVEL=log_level,
    )
    for key in ("STADI_OUTPUT", "STADI_ENDPOINT", "STADI_PROGRESS"):
        env.pop(key, None)  # the job file already says where the output goes
    if credentials_dir is not None:
        env["STADI_CREDENTIALS_DIR"] = str(credentials_dir)
    if slow_text:
        env["STADI_SLOWDOWN"] = slow_text
    if device == "cpu":
        # Ranks share the cores: without a cap every rank starts one thread per core and they thrash.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ordinals = visible.split(",") if visible else [str(i) for i in range(len(pool))]
        # Rank r drives cuda:r = the GPU the plan gave it (the planner may have left some out).
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ordinals[r.gpu_index or 0] for r in plan.ranks)

    procs: list[_Rank] = []
    reader = os.fdopen(read_fd, "r", buffering=1)
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    bar: _ProgressBar | None = None
    ok = False
    try:
        for r in range(world):
            rank_env = dict(env, RANK=str(r), LOCAL_RANK=str(r), STADI_ERROR_FILE=str(run_dir / f"error-{r}.json"))
            pass_fds: tuple[int, ...] = ()
            if r == 0:
                rank_env["STADI_PROGRESS"] = f"fd:{write_fd}"
                pass_fds = (write_fd,)
            log_file = run_dir / f"rank-{r}.log"
            with open(log_file, "wb") as log_fh:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "stadi_worker.launch"],
                    env=rank_env, pass_fds=pass_fds, start_new_session=True, stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                    stdout=None if verbose else log_fh, stderr=None if verbose else subprocess.STDOUT,
                )
            procs.append(_Rank(r, proc, run_dir / f"error-{r}.json", log_file))
        os.close(write_fd)  # rank 0 holds the only writer now: EOF on the pipe when it exits
        write_fd = -1
        bar = _ProgressBar(reader, progress_bar)
        rc = _supervise(procs, timeout_s)
        bar.join()
        if rc != 0:
            rank, message = _failure(procs)
            where = f"rank {rank}" if rank >= 0 else "a rank"
            print(f"stadi run: {where} failed: {message}", file=sys.stderr)
            print(f"stadi run: rank logs kept in {run_dir}", file=sys.stderr)
            return 1
        ok = True
    except KeyboardInterrupt:
        print("stadi run: interrupted; stopping the ranks", file=sys.stderr)
        return 130
    finally:
        _kill(procs)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if write_fd >= 0:
            os.close(write_fd)
        if bar is not None:
            bar.join(1.0)
        with contextlib.suppress(OSError):
            reader.close()
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)

    print(f"{plan.strategy} plan on {world} {device} rank(s); "
          f"images and manifest.json in {store.base_uri}", file=out)
    for name in _written(bar):
        print(f"  {name}", file=out)
    print(f"  {store.uri('manifest.json')}", file=out)
    return 0


def _written(bar: _ProgressBar | None) -> list[str]:
    return list(bar.images) if bar is not None else []


def _supervise(procs: Sequence[_Rank], timeout_s: float | None) -> int:
    """Wait for the ranks; on the first failure stop the others. 0 when every rank exited 0."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    lead_done_at: float | None = None
    while True:
        codes = [r.proc.poll() for r in procs]
        if any(c not in (None, 0) for c in codes):
            _kill(procs)
            return 1
        if all(c == 0 for c in codes):
            return 0
        now = time.monotonic()
        if codes[0] == 0 and lead_done_at is None:
            lead_done_at = now
        if lead_done_at is not None and now - lead_done_at > STRAGGLER_GRACE_S:
            _kill(procs)
            _fail_unfinished(procs, f"still running {STRAGGLER_GRACE_S:g} s after rank 0 finished")
            return 1
        if deadline is not None and now > deadline:
            _kill(procs)
            _fail_unfinished(procs, f"job exceeded activeDeadlineSeconds ({timeout_s:g} s)")
            return 1
        time.sleep(0.05)


def _fail_unfinished(procs: Sequence[_Rank], message: str) -> None:
    for r in procs:
        if r.proc.returncode not in (0, None) and not r.error_file.exists():
            r.error_file.write_text(json.dumps({"time": time.time(), "rank": r.rank, "message": message}))
            return


def run_command(args: argparse.Namespace) -> int:
    """``stadi run``."""
    try:
        job = read_job(args.job)
        why = not_runnable(job.spec.model.family)
        if why:
            raise WorkerError(why)
        if job.metadata.name is None:
            job.metadata.name = _name_from(Path(args.job))
        job = apply_output_overrides(job, args.output, args.endpoint)
        device = args.device or _default_device()
        return run_local(
            job, device=device, ranks=args.ranks, strategy=args.strategy, exact=args.exact,
            credentials_dir=Path(args.credentials_dir) if args.credentials_dir else None,
            progress_bar=False if args.no_progress else None, verbose=args.verbose,
            log_level=getattr(args, "log_level", "WARNING") or "WARNING",
            timeout_s=job.spec.active_deadline_seconds, slowdown=getattr(args, "slowdown", None) or (),
        )
    except (WorkerError, StorageError) as error:
        print(f"stadi run: {one_line(error)}", file=sys.stderr)
        return 1


def _name_from(path: Path) -> str:
    import re

    name = re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-")[:63].strip("-")
    return name or "job"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stadi_worker.launch``: one rank, configured from the environment (as ``stadi worker``)."""
    from stadi import logs
    from stadi_worker.commands import add_worker_arguments

    parser = argparse.ArgumentParser(prog="stadi-worker", description="Run one rank of a DiffusionJob.")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    logs.configure(os.environ.get("STADI_LOG_LEVEL") or "WARNING")
    return worker_command(args)


if __name__ == "__main__":
    sys.exit(main())
