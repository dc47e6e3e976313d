"""Rank 0's progress events: what ``stadi run``'s progress bar and the job's status are fed from."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

EventKind = Literal["start", "step", "image", "done", "replan"]


@dataclass(frozen=True)
class ProgressEvent:
    """Where rank 0 is: ``step`` of ``steps`` in the current image, ``images_done`` of ``images_total``.

    ``images_done`` counts skipped images too (they are done); ``images_skipped`` says how many of them were
    already in the output when the job started. ``uri`` is set on "image" events. A "replan" event (once,
    after the first image's warmup) carries the measured ``speeds`` per rank and the plan the job goes on
    with: its ``strategy``, ``strides`` and ``rows`` per rank (``[0, 0]``: an idle rank), and whether it changed
    (``replanned``).
    """

    kind: EventKind
    step: int
    steps: int
    images_done: int
    images_total: int
    images_skipped: int = 0
    uri: str | None = None
    speeds: list[float] | None = None
    strategy: str | None = None
    strides: list[int] | None = None
    rows: list[list[int]] | None = None
    replanned: bool | None = None

    def to_json(self) -> str:
        """One JSON line (no newline)."""
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> ProgressEvent:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(line))


Progress = Callable[[ProgressEvent], None]
