"""Speeds that persist. When a job succeeds, the speed its workers measured on each GPU (``status.measured``, the
warmup's profile, in planner units with the load of the time) goes into that node's GPUNode
(``status.learned``: one entry per GPU index, model family, resolution and compiled or not; the newest wins).
Later plans of the same kind of job take it ahead of the catalogue speed times (1 - load), weighted down with
its age: weight 0.5 ** (age / half-life), the rest the catalogue estimate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from stadi.api import DiffusionJobSpec, Plan
from stadi.planner import Device
from stadi_operator.controller.inventory import Telemetry
from stadi_operator.controller.runtime import Job
from stadi_operator.controller.status import stamp

MAX_ENTRIES = 64  # per GPUNode (the schema's bound): the oldest go first


@dataclass(frozen=True)
class Learned:
    """A learned speed as a plan takes it: the measured speed, its weight now, and its age."""

    speed: float
    weight: float
    age_s: float


def resolution_of(spec: DiffusionJobSpec) -> str:
    return f"{spec.width}x{spec.height}"


def learned_speeds(telemetry: Mapping[str, Iterable[Telemetry]], spec: DiffusionJobSpec, now: datetime,
                   half_life_s: float) -> dict[tuple[str, int], Learned]:
    """(node, GPU index) → the newest speed learned for a job like ``spec`` (family, resolution, compiled)."""
    found: dict[tuple[str, int], tuple[datetime, float]] = {}
    for node, store in telemetry.items():
        for tele in store:
            for e in tele.learned:
                if (e.family, e.resolution, e.compiled) != (spec.model.family, resolution_of(spec),
                                                             spec.model.compile):
                    continue
                key = (node, e.index)
                if key not in found or e.measured_at > found[key][0]:
                    found[key] = (e.measured_at, e.speed)
    out = {}
    for key, (when, speed) in found.items():
        age = max(0.0, (now - when).total_seconds())
        out[key] = Learned(speed, 0.5 ** (age / half_life_s), age)
    return out


def with_learned(devices: list[Device], learned: Mapping[tuple[str, int], Learned]) -> list[Device]:
    """The devices, a learned one's speed blended from what was measured and the catalogue estimate."""
    out = []
    for d in devices:
        got = learned.get((d.node or "", d.index if d.index is not None else -1))
        if got is None:
            out.append(d)
        else:
            out.append(replace(d, speed=got.weight * got.speed + (1 - got.weight) * d.effective_speed()))
    return out


def used(plan: Plan, learned: Mapping[tuple[str, int], Learned]) -> str:
    """The plan's GPUs that took a learned speed, for the event ("" when none did)."""
    found = [(r, learned[(r.node, r.gpu_index)]) for r in plan.active if (r.node, r.gpu_index) in learned]
    return ", ".join(f"{r.node}/{r.gpu}#{r.gpu_index} {got.speed:.3f} (weight {got.weight:.2f}, "
                     f"{got.age_s / 60:.0f} min old)" for r, got in found)


def record(job: Job, spec: DiffusionJobSpec) -> int:
    """Write the speeds the job's workers measured into the GPUNodes of its plan's GPUs (creating a GPUNode
    where no agent made one); returns how many GPUs were recorded."""
    st = job.status
    speeds = {int(m["rank"]): float(m["speed"]) for m in st.get("measured") or []
              if m.get("speed") and float(m["speed"]) > 0}
    by_node: dict[str, list[dict[str, Any]]] = {}
    for rank in (st.get("plan") or {}).get("ranks") or []:
        index = rank.get("gpuIndex", rank.get("gpu_index"))
        if rank.get("idle") or rank.get("node") is None or index is None or rank["rank"] not in speeds:
            continue
        by_node.setdefault(rank["node"], []).append({
            "index": int(index), "family": spec.model.family, "resolution": resolution_of(spec),
            "compiled": spec.model.compile, "speed": round(speeds[rank["rank"]], 4),
            "measuredAt": stamp(job.now), "job": f"{job.namespace}/{job.name}"})
    kube = job.kube
    for node, entries in by_node.items():
        current = kube.get_cluster("GPUNode", node) or kube.create_cluster({
            "apiVersion": "stadi.dev/v1alpha1", "kind": "GPUNode", "metadata": {"name": node},
            "spec": {"nodeName": node}})
        fresh = {(e["index"], e["family"], e["resolution"], e["compiled"]) for e in entries}
        kept = [e for e in (current.get("status") or {}).get("learned") or []
                if (e.get("index"), e.get("family"), e.get("resolution"), bool(e.get("compiled"))) not in fresh]
        learned = sorted(kept, key=lambda e: str(e.get("measuredAt")))[-(MAX_ENTRIES - len(entries)):] + entries
        kube.patch_cluster_status("GPUNode", node, {"status": {"learned": learned}})
    return sum(len(e) for e in by_node.values())
