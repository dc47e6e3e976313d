"""Rank 0's progress events on the command line: written as JSON lines (``progress_sink``) and drawn as a
progress bar by ``stadi run`` (``ProgressBar``, which follows rank 0's progress file)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from stadi_worker.job.progress import ProgressEvent

POLL_S = 0.05


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


class ProgressBar:
    """A tqdm bar over the steps a run generates, fed by the events rank 0 appends to ``path`` (followed on a
    thread until ``close``). ``enabled`` None: a bar on a terminal, nothing when stderr is a pipe or a file."""

    def __init__(self, path: Path, enabled: bool | None) -> None:
        self.path = path
        self._enabled = enabled
        self.images: list[str] = []
        self.finished = threading.Event()  # rank 0 sent its "done" event: the job is written
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="stadi-progress", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Read what rank 0 wrote up to now, then stop."""
        self._stop.set()
        self._thread.join(timeout)

    def _lines(self) -> Iterator[str]:
        while not self.path.exists():
            if self._stop.wait(POLL_S):
                return
        with open(self.path) as stream:
            partial = ""
            while True:
                partial += stream.readline()
                if partial.endswith("\n"):
                    yield partial
                    partial = ""
                elif self._stop.is_set():
                    return
                else:
                    time.sleep(POLL_S)  # at the end, or a line rank 0 is still writing

    def _follow(self) -> None:
        from tqdm import tqdm

        bar = None
        try:
            for line in self._lines():
                try:
                    event = ProgressEvent.from_json(line)
                except (ValueError, TypeError):
                    continue
                if event.kind == "done":
                    self.finished.set()
                if event.kind == "start":
                    todo = event.images_total - event.images_skipped
                    bar = tqdm(total=todo * event.steps, unit="step", dynamic_ncols=True,
                               disable=self._enabled is False if self._enabled is not None else None,
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
