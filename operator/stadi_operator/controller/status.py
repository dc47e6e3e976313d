"""Status bookkeeping of one handler run: field changes, conditions and timestamps, written as one patch."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from stadi.api import Condition


def stamp(moment: datetime) -> str:
    """An RFC 3339 UTC timestamp as Kubernetes writes them (``...Z``)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def measured_image_seconds(plan: Mapping[str, Any] | None, measured: Any) -> float | None:
    """Seconds per image the workers measured: rank 0's median step times the plan's steps (rank 0 runs every
    step, warmup included); None until rank 0 has reported its median."""
    rank0 = next((m for m in measured or [] if m.get("rank") == 0), {})
    median, steps = rank0.get("medianMs"), (plan or {}).get("steps")
    return float(median) * int(steps) / 1000.0 if median and steps else None


def parse_time(text: Any) -> datetime | None:
    """A timestamp of the API (naive ones taken as UTC); None when absent or unreadable."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class StatusUpdate:
    """The status changes of one handler run, written into kopf's patch at the end (one PATCH per run)."""

    def __init__(self, status: Mapping[str, Any] | None, generation: int | None, now: datetime) -> None:
        self.original = copy.deepcopy(dict(status or {}))
        self.generation = generation
        self.now = now
        self.changes: dict[str, Any] = {}
        self.conditions = [dict(c) for c in self.original.get("conditions") or []]
        self._conditions_changed = False

    def get(self, key: str, default: Any = None) -> Any:
        """A status field by its wire name, as this run has left it so far."""
        value = self.changes[key] if key in self.changes else self.original.get(key)
        return default if value is None else value

    @property
    def phase(self) -> str:
        return str(self.get("phase", "Pending"))

    def set(self, **fields: Any) -> None:
        """Set status fields by their wire (camelCase) names; None removes a field."""
        for key, value in fields.items():
            if self.original.get(key) != value or key in self.changes:
                self.changes[key] = value

    def condition_of(self, kind: str) -> dict[str, Any] | None:
        """The condition of this type, if the job has one."""
        return next((c for c in self.conditions if c.get("type") == kind), None)

    def condition(self, kind: str, status: str, reason: str, message: str = "") -> bool:
        """Set a condition; lastTransitionTime moves only when its status changes. True if the status changed."""
        old = self.condition_of(kind)
        changed = old is None or old.get("status") != status
        new = Condition(
            type=kind, status=status, reason=reason, message=message, observed_generation=self.generation,
            last_transition_time=self.now if changed else parse_time(old.get("lastTransitionTime")) or self.now,
        ).dump()
        if old != new:
            self.conditions = [c for c in self.conditions if c.get("type") != kind] + [new]
            self._conditions_changed = True
        return changed

    def apply(self, patch: kopf.Patch) -> None:
        """Write the changes into kopf's patch of the object."""
        for key, value in self.changes.items():
            patch.status[key] = value
        if self._conditions_changed:
            patch.status["conditions"] = self.conditions
